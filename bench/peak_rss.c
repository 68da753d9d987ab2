/* bench/peak_rss.c - runs a command and prints its peak resident set size to stderr: "peak_rss_kb N".
 *   peak_rss COMMAND [ARGS...]
 * A launcher of its own because Linux carries the high-water mark across execve: a child forked straight
 * from the (large) Python bench process would report Python's RSS, not its own. */
#include <stdio.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return fprintf(stderr, "usage: peak_rss COMMAND [ARGS...]\n"), 2;
    pid_t pid = fork();
    if (pid < 0) return perror("fork"), 2;
    if (pid == 0) {
        execvp(argv[1], argv + 1);
        perror(argv[1]);
        _exit(127);
    }
    int status;
    struct rusage usage;
    if (wait4(pid, &status, 0, &usage) < 0) return perror("wait4"), 2;
    fprintf(stderr, "peak_rss_kb %ld\n", usage.ru_maxrss);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 2;
}
