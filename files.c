/* files.c - checked inputs and outputs for ./run (files.h). */
#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model.h"

int open_regular_file(const char *path) {
    /* O_NONBLOCK: opening a FIFO for reading would wait for a writer before fstat could look at it */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return NOT_REGULAR_FILE;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

char *read_whole_file(const char *path, size_t max_bytes, size_t *len, char *err, size_t errlen) {
    int fd = strcmp(path, "-") == 0 ? STDIN_FILENO : open_regular_file(path);
    if (fd < 0) {
        snprintf(err, errlen, "%s", fd == NOT_REGULAR_FILE ? "not a regular file" : strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *text = malloc(cap);
    const char *why = text ? NULL : "out of memory";
    while (!why) { /* reads at most max_bytes + 1 bytes: one more than allowed tells the file is too large */
        if (n + 1 == cap) {
            char *more = realloc(text, cap * 2);
            if (!more) {
                why = "out of memory";
                break;
            }
            text = more, cap *= 2;
        }
        size_t want = cap - n - 1 < max_bytes + 1 - n ? cap - n - 1 : max_bytes + 1 - n;
        ssize_t got = read(fd, text + n, want);
        if (got < 0 && errno != EINTR) why = strerror(errno);
        if (got == 0) break;
        if (got > 0) n += (size_t)got;
        if (n > max_bytes) {
            snprintf(err, errlen, "larger than %zu MiB", max_bytes >> 20);
            why = err;
        }
    }
    if (fd != STDIN_FILENO) close(fd);
    if (why) {
        if (why != err) snprintf(err, errlen, "%s", why);
        free(text);
        return NULL;
    }
    text[n] = '\0';
    *len = n;
    return text;
}

int check_output_path(const char *path, char *err, size_t errlen) {
    struct stat st;
    if (!*path) return snprintf(err, errlen, "the path is empty"), -1;
    if (stat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode)) return snprintf(err, errlen, "%s", strerror(EISDIR)), -1;
        if (access(path, W_OK) != 0) return snprintf(err, errlen, "%s", strerror(errno)), -1;
        return 0;
    }
    if (errno != ENOENT) return snprintf(err, errlen, "%s", strerror(errno)), -1;
    /* a new file: its directory must exist and take new names */
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else snprintf(dir, sizeof dir, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    if (stat(dir, &st) != 0) return snprintf(err, errlen, "%s", strerror(errno)), -1;
    if (!S_ISDIR(st.st_mode)) return snprintf(err, errlen, "%s", strerror(ENOTDIR)), -1;
    if (access(dir, W_OK | X_OK) != 0) return snprintf(err, errlen, "%s", strerror(errno)), -1;
    return 0;
}

/* The directory part of path, resolved (symbolic links, "..") into buf, followed by the last name */
static int canonical_name(const char *path, char *buf) {
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/'), *name = slash ? slash + 1 : path;
    if (!slash) snprintf(dir, sizeof dir, ".");
    else snprintf(dir, sizeof dir, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    if (!realpath(dir, buf) || strlen(buf) + 1 + strlen(name) >= PATH_MAX) return -1;
    strcat(strcat(buf, "/"), name);
    return 0;
}

int same_file(const char *a, const char *b) {
    struct stat sa, sb;
    int has_a = stat(a, &sa) == 0, has_b = stat(b, &sb) == 0;
    if (has_a && has_b) return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
    if (has_a || has_b) return 0;
    char ca[PATH_MAX], cb[PATH_MAX];
    return canonical_name(a, ca) == 0 && canonical_name(b, cb) == 0 && strcmp(ca, cb) == 0;
}

int reopen_closed_standard_streams(void) {
    int closed = 0;
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
            closed |= 1 << fd;
            open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY); /* takes the lowest free descriptor: fd */
        }
    return closed;
}

void check_stdout(int close_it) {
    int bad = fflush(stdout) != 0 || ferror(stdout);
    if (!bad && close_it) bad = fclose(stdout) != 0;
    if (!bad) return;
    fprintf(stderr, "error: cannot write to standard output: %s\n", errno ? strerror(errno) : "write error");
    exit(1);
}

static char sigbus_message[PATH_MAX + 200];
static size_t sigbus_length;

static void on_sigbus(int sig) {
    (void)sig;
    ssize_t unused = write(STDERR_FILENO, sigbus_message, sigbus_length); /* async-signal-safe: write, _exit */
    (void)unused;
    _exit(1);
}

void exit_on_sigbus(const char *model_path) {
    snprintf(sigbus_message, sizeof sigbus_message - 1,
             "error: %s: the model file changed while in use (cut short or rewritten in place); replace a model by "
             "renaming a new file over it", model_path);
    make_printable(sigbus_message);
    strcat(sigbus_message, "\n");
    sigbus_length = strlen(sigbus_message);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigbus;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
}
