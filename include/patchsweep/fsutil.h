/*
 * fsutil: small file helpers shared by every reader of untrusted files.
 */
#ifndef PS_FSUTIL_H
#define PS_FSUTIL_H

#include <stdbool.h>
#include <stddef.h>

#include "err.h"

/* Read the whole file at `path` into a NUL-terminated malloc'd buffer.
 * Files larger than `max_bytes` are refused (PS_ERR_NOMEM naming the limit)
 * instead of exhausting memory.  *data is owned by the caller (free()). */
ps_status fs_read_file(const char *path, size_t max_bytes, char **data, size_t *len);

/* "dir/name" in a malloc'd string (NULL on allocation failure). */
char *fs_join(const char *dir, const char *name);

/* True if `path` names an existing regular file. */
bool fs_is_file(const char *path);

/* An output path may be new or a regular file: every writer renames
 * NAME.partial over it, which would replace a device (/dev/null), a
 * directory's entry or a symlink.  PS_ERR_IO naming the path otherwise. */
ps_status fs_check_output(const char *path);

/* Directory part of `path` ("." if none), malloc'd. */
char *fs_dirname(const char *path);

/* Directory of the running executable (/proc/self/exe with symlinks
 * resolved), malloc'd; NULL if it cannot be read (no /proc) or on
 * allocation failure.  Lets a program find files installed beside it
 * (PREFIX/bin -> PREFIX/share) without a path compiled in. */
char *fs_exe_dir(void);

/* An exclusive lock owned by this process: an fcntl write lock on the file
 * `path`, which holds "pid=P host=H since=UTC" of the owner for the
 * message of the next comer.  fcntl locks end with the process however it
 * ends (kill -9 included), so a lock file left by a dead owner is stale and
 * simply taken over; they work across the nodes of a cluster on NFS
 * (lockd) and Lustre/GPFS mounted with locking (flock/localflock off: then
 * only within a node).  fd -1 when not held. */
typedef struct {
    int fd;
    char *path;
} fs_lock;

/* Take the lock at once or fail: PS_ERR_INVALID "`what` is in use by ...
 * pid P on host H (since T)" when another process holds it; PS_ERR_IO when
 * the file cannot be created. */
ps_status fs_lock_take(fs_lock *l, const char *path, const char *what);

/* Release it and remove the file (nothing if not held). */
void fs_lock_release(fs_lock *l);

#endif
