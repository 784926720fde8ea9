/*
 * cmd_sweep: `patchsweep sweep JOB.ini`, alone or under mpirun/srun.
 * Exit status: 0 complete, 1 failed, 2 usage error, 3 stopped by a signal
 * (SIGTERM, SIGINT, SIGUSR1) after finishing the chunk in flight: the
 * results so far are in the file and the journal; rerunning resumes.
 */
#ifndef PS_CMD_SWEEP_H
#define PS_CMD_SWEEP_H

#define SWEEP_EXIT_INTERRUPTED 3

int cmd_sweep(int argc, char **argv);

#endif
