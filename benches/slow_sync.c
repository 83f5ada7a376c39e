/* Makes every fsync and fdatasync of the process it is preloaded into SLOW_SYNC_US
 * microseconds slower (2000 unless set): a disk whose syncs cost milliseconds, on a
 * machine whose disk syncs in well under one. benches/rf3_rate.sh builds and preloads it
 * into the servers when SLOW_SYNC_US is set. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

static void slower(void) {
    const char *us = getenv("SLOW_SYNC_US");
    usleep(us ? (useconds_t)atoi(us) : 2000);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slower();
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slower();
    return real(fd);
}
