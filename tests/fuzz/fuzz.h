/*
 * Shared by the fuzz targets (tests/fuzz/fuzz_*.c): the libFuzzer entry points and a check
 * that aborts, so that a broken invariant is a crash both under libFuzzer and under the plain
 * replay driver (driver.c).
 */
#ifndef SAGA_FUZZ_H
#define SAGA_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* Aborts with the failed condition when cond is false (never compiled out). */
#define FUZZ_CHECK(cond)                                                                        \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      fprintf(stderr, "%s:%d: fuzz check failed: %s\n", __FILE__, __LINE__, #cond);             \
      abort();                                                                                  \
    }                                                                                           \
  } while (0)

#endif /* SAGA_FUZZ_H */
