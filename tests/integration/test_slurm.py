"""The Slurm job scripts end to end on a real one-node Slurm cluster
(slurm/local-cluster.sh: munged, slurmctld and slurmd started here, stopped
at the end, also on failure):
  - slurm/patchsweep.sbatch refuses to run outside Slurm (exit 2, one line);
  - a 2-task job (srun --mpi=pmix --kill-on-bad-exit=1) writes the file `mpirun -np 2` writes,
    bit for bit;
  - the warning signal path: `scancel --signal=USR1 --batch` (what
    --signal=B:USR1@120 sends before the time limit) stops the sweep after
    the chunk in flight, the script requeues the job, the second run resumes
    and completes to identical values;
  - scancel (SIGTERM to the shell and the steps): the job ends cancelled, not
    requeued, the file says complete = 0; the same submission again
    resumes and completes to identical values;
  - node failure: the node set down (scontrol update state=down) once a
    chunk is journaled: Slurm kills the job and requeues it (--requeue); the
    node up again (by itself under ReturnToService=2, else state=resume),
    the second run resumes and ends identical;
  - slurm/patchsweep-array.sbatch with 3 array tasks (ranks started by the
    mpirun fallback) and `patchsweep merge` of the parts equal the unsliced
    run bit for bit;
  - the cluster stops with no daemon left.
Needs root and Debian's slurmctld, slurmd, slurm-client and munge (make deps).
PS_QUICK (the sanitizer build): the 2-task job and the array only."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import netCDF4
import numpy as np

from checks import MPI_VARS, check, failed, finish, private_binary

ROOT = os.environ.get("PS_ROOT") or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("PS_BIN") or os.path.join(ROOT, "build", "rel", "patchsweep")
QUICK = os.environ.get("PS_QUICK") == "1"
CLUSTER = os.path.join(ROOT, "slurm", "local-cluster.sh")
SBATCH = os.path.join(ROOT, "slurm", "patchsweep.sbatch")
ARRAY = os.path.join(ROOT, "slurm", "patchsweep-array.sbatch")
T0 = time.time()


def done():
    finish("slurm", f" ({time.time() - T0:.0f} s)")


if os.geteuid() != 0:
    check("running as root (munged, slurmctld and slurmd need it)", False, f"uid {os.geteuid()}")
    done()
missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
           if not shutil.which(c)]
if missing:
    check("Slurm installed", False,
          f"missing {' '.join(missing)}: make deps (apt-get install slurmctld slurmd slurm-client munge)")
    done()

TMP = tempfile.mkdtemp(prefix="ps-slurm-")
os.chmod(TMP, 0o755)  # munged runs as user munge and keeps its socket in TMP/cluster
BIN = private_binary(BIN, TMP)


def free_port_pair():
    """Two consecutive free TCP ports (slurmctld, slurmd): a cluster of a user
    or of a concurrent test run keeps its own."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of TCP ports")


# The cluster's state lives in TMP; only SLURM_CONF points the clients at it.
# Inherited SLURM_* variables (a test run inside a Slurm job) would confuse
# sbatch and the scripts' outside-Slurm check.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("SBATCH_")
       and not k.startswith("SRUN_")}
ENV.update(PATCHSWEEP_SLURM_DIR=os.path.join(TMP, "cluster"), PATCHSWEEP_SLURM_PORT=str(free_port_pair()),
           SLURM_CONF=os.path.join(TMP, "cluster", "etc", "slurm.conf"), PATCHSWEEP_BIN=BIN, **MPI_VARS)


def sh(args, timeout=120, **kw):
    return subprocess.run(args, capture_output=True, text=True, env=kw.pop("env", ENV), cwd=kw.pop("cwd", TMP),
                          timeout=timeout, **kw)


def stop_cluster():
    return sh([CLUSTER, "stop"], timeout=120)


def on_signal(sig, frame):
    stop_cluster()
    shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(128 + sig)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)


def nc_values(path):
    """Every variable's raw values (no masking: fill values and NaN payloads
    compared as bits), strings as lists."""
    out = {}
    with netCDF4.Dataset(path) as ds:
        ds.set_auto_mask(False)
        for name, var in ds.variables.items():
            v = var[:]
            out[name] = [str(x) for x in np.ravel(v)] if v.dtype.kind in "OUS" else (v.dtype.str, v.shape, v.tobytes())
        attrs = {a: ds.getncattr(a) for a in ds.ncattrs()}
    return out, attrs


def same_values(a, b):
    va, vb = nc_values(a)[0], nc_values(b)[0]
    diff = sorted(k for k in va.keys() | vb.keys() if va.get(k) != vb.get(k))
    return not diff, diff


def submit(args):
    r = sh(["sbatch", "--parsable"] + args)
    if r.returncode != 0:
        raise RuntimeError("sbatch failed: " + r.stderr.strip())
    return r.stdout.strip().split(";")[0]


def job_records(jid):
    """scontrol show job: one dict per job record (an array job has one per task)."""
    r = sh(["scontrol", "show", "job", jid])
    recs = []
    for block in r.stdout.split("\n\n"):
        fields = dict(re.findall(r"(\w+)=(\S*)", block))
        if "JobId" in fields:
            recs.append(fields)
    return recs


def wait_job(jid, timeout):
    """Until squeue no longer lists the job (no accounting here: squeue and
    scontrol show job are what there is); its scontrol records."""
    end = time.time() + timeout
    while time.time() < end:
        r = sh(["squeue", "-h", "-j", jid, "-o", "%T"])
        if r.returncode == 0 and not r.stdout.strip():
            return job_records(jid)
        time.sleep(0.3)
    return None


def wait_journal(output, timeout):
    """True once the sweep writing `output` has journaled a chunk: the
    journal is fdatasync'ed per chunk, while srun may hold back the ranks'
    progress lines, so the log can lag behind the work."""
    path = os.path.join(TMP, output + ".journal")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > 600:
            return True
        time.sleep(0.05)
    return False


def log_of(name):
    path = os.path.join(TMP, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def mpirun_ref(job, out):
    r = sh(["mpirun", "--oversubscribe", "-np", "2", BIN, "sweep", job, "--output", out], timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"reference run of {job} failed: {r.stderr[-500:]}")


def write_job(name, components="resid_pre,attn_out,mlp_out,z_all_pos,z", engine="fast", chunk=3, model="model",
              dataset="ioi.jsonl"):
    path = os.path.join(TMP, name + ".ini")
    with open(path, "w") as f:
        f.write(f"; {name}\n[model]\ndir = {model}\n[data]\ndataset = {dataset}\n"
                f"[patch]\ncomponents = {components}\nengine = {engine}\n"
                f"[run]\noutput = {name}.nc\nchunk_prompts = {chunk}\nprogress_seconds = 0.1\n")
    return name + ".ini"


try:
    subprocess.run(["/usr/bin/python3", f"{ROOT}/tests/tools/make_model.py", "--layers", "3", "--heads", "4",
                    "--d-model", "32", "--std", "0.3", "-o", os.path.join(TMP, "model")], check=True,
                   capture_output=True)
    subprocess.run([BIN, "make-dataset", "ioi", "--n", "24", "--seed", "11", "-o", os.path.join(TMP, "ioi.jsonl")],
                   check=True, capture_output=True)
    job = write_job("main")
    # The job the tests interrupt must outlast the signal's way through Slurm
    # (scancel -> slurmd -> batch shell -> ranks) on an idle machine too:
    # the naive engine, one prompt per chunk, a wider model and 48 prompts
    # take several seconds; the signal goes out once a chunk is journaled.
    subprocess.run(["/usr/bin/python3", f"{ROOT}/tests/tools/make_model.py", "--layers", "4", "--heads", "4",
                    "--d-model", "64", "--n-positions", "64", "--std", "0.3", "-o", os.path.join(TMP, "model-slow")],
                   check=True, capture_output=True)
    subprocess.run([BIN, "make-dataset", "ioi", "--n", "48", "--seed", "12", "-o", os.path.join(TMP, "ioi48.jsonl")],
                   check=True, capture_output=True)
    slow = write_job("slow", components="resid_pre,z_all_pos", engine="naive", chunk=1, model="model-slow",
                     dataset="ioi48.jsonl")

    # --- outside Slurm ----------------------------------------------------
    for script in (SBATCH, ARRAY):
        r = sh(["bash", script, job])
        lines = r.stderr.strip().splitlines()
        check(f"{os.path.basename(script)} outside Slurm: exit 2, one line", r.returncode == 2 and len(lines) == 1
              and "SLURM_JOB_ID" in lines[0] and not r.stdout, f"{r.returncode} {r.stdout!r} {r.stderr!r}")

    # --- the cluster ------------------------------------------------------
    t = time.time()
    r = sh([CLUSTER, "start"], timeout=120)
    check("local cluster starts", r.returncode == 0 and "up" in r.stdout, r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError("no cluster: " + log_of("cluster/log/slurmctld.log")[-800:] +
                           log_of("cluster/log/slurmd.log")[-800:])
    r = sh([CLUSTER, "start"], timeout=60)
    check("start again: already running", r.returncode == 0 and "already running" in r.stdout, r.stdout + r.stderr)
    print(f"     (cluster up in {time.time() - t:.1f} s)", flush=True)

    mpirun_ref(job, "ref.nc")

    # --- a 2-task job ---------------------------------------------------------
    jid = submit(["--ntasks=2", "--cpus-per-task=1", "--time=5", SBATCH, job, "--output", "sb.nc"])
    recs = wait_job(jid, 120)
    log = log_of(f"patchsweep-{jid}.out")
    check("2-task job completes", recs and recs[0].get("JobState") == "COMPLETED"
          and recs[0].get("ExitCode") == "0:0", (recs, log[-1500:]))
    check("2-task job: srun --mpi=pmix --kill-on-bad-exit=1, 2 ranks, 1 BLAS thread each", "srun --mpi=pmix --kill-on-bad-exit=1 --ntasks=2 --cpus-per-task=1"
          in log and "2 ranks (Open MPI" in log and "1 threads per rank" in log, log[-1500:])
    ok, diff = same_values(os.path.join(TMP, "ref.nc"), os.path.join(TMP, "sb.nc")) \
        if os.path.exists(os.path.join(TMP, "sb.nc")) else (False, "no sb.nc")
    check("2-task job's file equals mpirun -np 2's bit for bit", ok, diff)

    if not QUICK:
        mpirun_ref(slow, "slow-ref.nc")

        # --- the warning signal: stop, requeue, resume ------------------------
        jid = submit(["--ntasks=2", "--cpus-per-task=1", "--time=5", SBATCH, slow, "--output", "rq.nc"])
        logname = os.path.join(TMP, f"patchsweep-{jid}.out")
        started = wait_journal("rq.nc", 120)
        r = sh(["scancel", "--signal=USR1", "--batch", jid])
        check("warning signal sent mid-run", started and r.returncode == 0, r.stderr + log_of(logname)[-800:])
        recs = wait_job(jid, 150)
        log = log_of(logname)
        check("requeued job completes", recs and recs[0].get("JobState") == "COMPLETED"
              and recs[0].get("ExitCode") == "0:0" and recs[0].get("Restarts") == "1", (recs, log[-2000:]))
        m = re.search(r"stopped by a signal after (\d+) of 48 prompts", log)
        check("first run stopped after the chunk in flight, requeued", m and 0 < int(m.group(1)) < 48
              and "requeueing job" in log and "run 2 on" in log, log[-2000:])
        check("second run resumed", re.search(r"48 of 48 prompts done \(\d+ from an earlier run\)", log) is not None,
              log[-1500:])
        ok, diff = same_values(os.path.join(TMP, "slow-ref.nc"), os.path.join(TMP, "rq.nc")) \
            if os.path.exists(os.path.join(TMP, "rq.nc")) else (False, "no rq.nc")
        check("requeued job's file equals the uninterrupted run's bit for bit", ok, diff)
        check("journal removed", not os.path.exists(os.path.join(TMP, "rq.nc.journal")))

        # --- scancel: no requeue; submitting again resumes ----------------------
        args = ["--ntasks=2", "--cpus-per-task=1", "--time=5", SBATCH, slow, "--output", "cx.nc"]
        jid = submit(args)
        logname = os.path.join(TMP, f"patchsweep-{jid}.out")
        started = wait_journal("cx.nc", 120)
        sh(["scancel", jid])
        recs = wait_job(jid, 120)
        log = log_of(logname)
        check("scancel: job cancelled, not requeued", started and recs and recs[0].get("JobState") == "CANCELLED"
              and recs[0].get("Restarts") == "0" and "requeueing" not in log, (recs, log[-1500:]))
        cx = os.path.join(TMP, "cx.nc")
        attrs = nc_values(cx)[1] if os.path.exists(cx) else {}
        check("scancel: file marked incomplete, journal kept", attrs.get("complete") == 0
              and os.path.exists(cx + ".journal"), (attrs.get("complete"), log[-1500:]))
        jid = submit(args)
        recs = wait_job(jid, 150)
        log = log_of(f"patchsweep-{jid}.out")
        check("resubmitted job resumes and completes", recs and recs[0].get("JobState") == "COMPLETED"
              and "from an earlier run" in log, (recs, log[-1500:]))
        ok, diff = same_values(os.path.join(TMP, "slow-ref.nc"), cx) if os.path.exists(cx) else (False, "no cx.nc")
        check("resumed job's file equals the uninterrupted run's bit for bit", ok, diff)

        # --- node failure: the node set down mid-job, the job requeued -----------
        # The one node goes down (scontrol, as slurmctld does when slurmd
        # stops answering) once a chunk is journaled: Slurm kills the job
        # and, as it may be requeued (--requeue), puts it back in the queue.
        # It waits until the node is up again (by itself, or state=resume)
        # and the second run resumes from the journal.
        args = ["--ntasks=2", "--cpus-per-task=1", "--time=5", SBATCH, slow, "--output", "nf.nc"]
        jid = submit(args)
        logname = os.path.join(TMP, f"patchsweep-{jid}.out")
        started = wait_journal("nf.nc", 120)
        node = sh(["sinfo", "-h", "-o", "%N"]).stdout.strip()
        r = sh(["scontrol", "update", f"nodename={node}", "state=down", "reason=patchsweep test: node failure"])
        check("node set down mid-job", started and r.returncode == 0 and node, r.stdout + r.stderr)
        requeued, rec = False, {}
        end = time.time() + 120
        while time.time() < end and not requeued:
            rec = (job_records(jid) or [{}])[0]
            requeued = rec.get("Restarts") == "1" and rec.get("JobState") in ("PENDING", "REQUEUED", "REQUEUE_HOLD")
            time.sleep(0.2)
        check("job requeued after the node failure (pending, 1 restart)", requeued, (rec, log_of(logname)[-1500:]))
        # Back up: slurmd still answers, so under ReturnToService=2 (the local
        # cluster's) the node may have registered and come back by itself;
        # a node still DOWN is resumed by hand, as an admin would.
        state = sh(["sinfo", "-h", "-n", node, "-o", "%T"]).stdout.strip()
        if "down" in state.lower():
            r = sh(["scontrol", "update", f"nodename={node}", "state=resume"])
            check(f"node back up (was {state}: scontrol update state=resume)", r.returncode == 0,
                  r.stdout + r.stderr)
        else:
            print(f"     (node {node} back by itself after the job's requeue: {state})", flush=True)
        recs = wait_job(jid, 240)
        log = log_of(logname)
        check("requeued job completes after the node failure", recs and recs[0].get("JobState") == "COMPLETED"
              and recs[0].get("ExitCode") == "0:0" and recs[0].get("Restarts") == "1", (recs, log[-2000:]))
        check("second run resumed from the journal", "run 2 on" in log
              and re.search(r"48 of 48 prompts done \(\d+ from an earlier run\)", log) is not None, log[-2000:])
        nf = os.path.join(TMP, "nf.nc")
        ok, diff = same_values(os.path.join(TMP, "slow-ref.nc"), nf) if os.path.exists(nf) else (False, "no nf.nc")
        check("after the node failure: the file equals the uninterrupted run's bit for bit", ok, diff)

    # --- array job and merge ---------------------------------------------------
    # 3 tasks of 2 ranks on 1 CPU each (--overcommit), ranks started by the
    # mpirun fallback; parts named after the job's output: main.parts/.
    env = dict(ENV, PATCHSWEEP_LAUNCHER="mpirun")
    r = sh(["sbatch", "--parsable", "--array=0-2", "--ntasks=2", "--cpus-per-task=1", "--overcommit", "--time=5",
            ARRAY, job], env=env)
    jid = r.stdout.strip().split(";")[0]
    recs = wait_job(jid, 150) if r.returncode == 0 else None
    logs = "".join(log_of(f"patchsweep-array-{jid}_{i}.out") for i in range(3))
    check("array: 3 tasks complete", recs and len(recs) == 3 and all(x.get("JobState") == "COMPLETED"
                                                                      and x.get("ExitCode") == "0:0" for x in recs),
          (r.stderr, recs, logs[-2000:]))
    check("array: mpirun fallback, slices 1/3..3/3", all(f"--slice {k}/3 --output ./main.parts/part-{k}-of-3.nc"
                                                         in logs for k in (1, 2, 3)) and "mpirun -np 2" in logs,
          logs[-2000:])
    parts = [os.path.join(TMP, "main.parts", f"part-{k}-of-3.nc") for k in (3, 1, 2)]
    r = sh([BIN, "merge"] + parts + ["-o", "merged.nc"])
    check("merge of the parts", r.returncode == 0 and "24 prompts" in r.stdout, r.stdout + r.stderr)
    merged = os.path.join(TMP, "merged.nc")
    ok, diff = same_values(os.path.join(TMP, "ref.nc"), merged) if os.path.exists(merged) else (False, "no file")
    check("merged file equals the unsliced run bit for bit", ok, diff)
    if os.path.exists(merged):
        a = nc_values(merged)[1]
        check("merged attributes", a.get("slice") == "all" and a.get("complete") == 1
              and a.get("merged_from", "").split("\n") == sorted(parts) and "merge" in a.get("command_line", ""),
              {k: a.get(k) for k in ("slice", "complete", "merged_from", "command_line")})
except Exception as e:  # a broken step fails the test; the cluster still stops
    check("test ran to the end", False, f"{type(e).__name__}: {e}")
finally:
    t = time.time()
    r = stop_cluster()
    check("local cluster stops", r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr)
    print(f"     (cluster stopped in {time.time() - t:.1f} s)", flush=True)
    r = sh([CLUSTER, "status"])
    check("no daemon left", r.returncode == 3 and "munged down, slurmctld down, slurmd down" in r.stdout,
          r.stdout + r.stderr)
    if not failed():
        shutil.rmtree(TMP, ignore_errors=True)
    else:
        print(f"     (files kept in {TMP})")
done()
