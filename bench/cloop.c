/* The baseline: the smallest possible supervisor. Starts N copies of a command and restarts
 * each the moment it exits (fork + exec + wait, no delay). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t spawn(char **argv) {
    pid_t pid = fork();
    if (pid == 0) {
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: cloop N COMMAND [ARGS...]\n");
        return 2;
    }
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) spawn(argv + 2);
    for (;;) {
        int status;
        if (wait(&status) > 0) spawn(argv + 2);
    }
}
