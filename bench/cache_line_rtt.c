// Cache-line round trip between CPU 0 and CPU 1: labels the dev VM's vCPU placement for the
// collectives benchmarks in the README (~80 ns: the vCPUs share a cache, "near"; ~330 ns: they do
// not, "far"). Not part of the tests.
//
//   gcc -O2 -pthread -o /tmp/cache_line_rtt bench/cache_line_rtt.c && /tmp/cache_line_rtt
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

enum { ROUNDS = 200000 };
static _Alignas(128) volatile uint64_t line;

static int pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *echo(void *arg) {
    (void)arg;
    if (pin(1) != 0) return (void *)1;
    for (uint64_t i = 0; i < ROUNDS; i++) {
        while (__atomic_load_n(&line, __ATOMIC_ACQUIRE) != 2 * i + 1) {
        }
        __atomic_store_n(&line, 2 * i + 2, __ATOMIC_RELEASE);
    }
    return NULL;
}

int main(void) {
    pthread_t thread;
    if (pin(0) != 0 || pthread_create(&thread, NULL, echo, NULL) != 0) {
        fprintf(stderr, "cannot pin to CPUs 0 and 1\n");
        return 1;
    }
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (uint64_t i = 0; i < ROUNDS; i++) {
        __atomic_store_n(&line, 2 * i + 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(&line, __ATOMIC_ACQUIRE) != 2 * i + 2) {
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    void *failed;
    pthread_join(thread, &failed);
    if (failed) {
        fprintf(stderr, "cannot pin to CPU 1\n");
        return 1;
    }
    double ns = (end.tv_sec - start.tv_sec) * 1e9 + (end.tv_nsec - start.tv_nsec);
    printf("round trip %.0f ns\n", ns / ROUNDS);
    return 0;
}
