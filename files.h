/* files.h - the files ./run reads and writes, handled as tools trusted with files from the internet do:
 * inputs must be regular files (a FIFO, a terminal or /dev/zero would block or never end) of a bounded size;
 * outputs are checked before the run (so a typo costs nothing) and may not be one of the inputs; standard
 * output is checked to the last byte; a model file cut short under the run ends it with one line. */
#ifndef ATTN_FILES_H
#define ATTN_FILES_H

#include <stddef.h>

#define NOT_REGULAR_FILE (-2) /* open_regular_file: the path is a directory, a FIFO, a device ... */

/* Opens path for reading without blocking on a FIFO, and keeps it only if it is a regular file. Returns the
 * descriptor, -1 with errno set, or NOT_REGULAR_FILE. */
int open_regular_file(const char *path);
/* The whole of a regular file ("-": standard input, whatever it is) as a NUL-terminated string, at most
 * max_bytes long. NULL with one line in err (what is wrong, without the path) otherwise. */
char *read_whole_file(const char *path, size_t max_bytes, size_t *len, char *err, size_t errlen);
/* 0 if path can be written: an existing file that is not a directory and may be written, or a new name in a
 * directory that exists and may be written. -1 with the reason in err otherwise. */
int check_output_path(const char *path, char *err, size_t errlen);
/* 1 if a and b name the same file: the same inode (through symbolic and hard links), or for names that do
 * not exist yet, the same name in the same directory. */
int same_file(const char *a, const char *b);

/* Standard input, output and error that the caller closed (`>&-`) are opened on /dev/null, so that no file
 * opened later takes their descriptor (printf would write into it). Returns a bit mask of the ones that
 * were closed: 1 << 0 stdin, 1 << 1 stdout, 1 << 2 stderr. */
int reopen_closed_standard_streams(void);
/* Flushes standard output; on a failed write (a full disk, /dev/full, a closed descriptor) prints one
 * `error:` line and exits with status 1. With close_it, closes it too (the last write may fail only then). */
void check_stdout(int close_it);

/* From here on, a SIGBUS (the mapped model file was truncated under the run) prints one line naming it and
 * exits with status 1 instead of dying on the signal. */
void exit_on_sigbus(const char *model_path);

#endif
