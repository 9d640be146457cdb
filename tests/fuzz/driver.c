/*
 * The plain replay driver: a main() for the fuzz targets when they are not built with
 * libFuzzer (gcc, or SAGA_FUZZ off). Each argument is a file or a directory (its regular
 * files, in name order); every input is passed once to LLVMFuzzerTestOneInput, after an empty
 * input (as libFuzzer does). A target reports a problem by crashing (FUZZ_CHECK, a sanitizer),
 * so reaching the end means every input passed.
 *
 * Under AddressSanitizer a malloc hook also stops the run when any single allocation reaches
 * FUZZ_MALLOC_LIMIT_MB (default 64), like libFuzzer's -malloc_limit_mb: hostile bytes must
 * never make a decoder ask for memory out of proportion to their length.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

/* LLVMFuzzerInitialize is optional for a target. */
__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

#if defined(__SANITIZE_ADDRESS__)
#define FUZZ_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUZZ_ASAN 1
#endif
#endif

#ifdef FUZZ_ASAN
int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void *, size_t),
                                              void (*free_hook)(const volatile void *));
static size_t malloc_limit;
static const char *current = "(none)";

static void malloc_hook(const volatile void *p, size_t size) {
  (void)p;
  if (size >= malloc_limit) {
    /* No stdio here: this runs inside the allocator. */
    static const char msg[] = "fuzz driver: single allocation over FUZZ_MALLOC_LIMIT_MB in ";
    fwrite(msg, 1, sizeof msg - 1, stderr);
    fwrite(current, 1, strlen(current), stderr);
    fwrite("\n", 1, 1, stderr);
    abort();
  }
}

/* The sanitizer takes the pair only when both are given. */
static void free_hook(const volatile void *p) { (void)p; }

static void install_hook(void) {
  const char *s = getenv("FUZZ_MALLOC_LIMIT_MB");
  size_t mb = s != NULL && atol(s) > 0 ? (size_t)atol(s) : 64;
  malloc_limit = mb << 20;
  if (__sanitizer_install_malloc_and_free_hooks(malloc_hook, free_hook) == 0) {
    fprintf(stderr, "fuzz driver: cannot install the malloc hook\n");
    exit(1);
  }
}
#define SET_CURRENT(name) (current = (name))
#else
static void install_hook(void) {}
#define SET_CURRENT(name) ((void)(name))
#endif

static int run_file(const char *path, size_t *count) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) {
    fprintf(stderr, "%s: %s\n", path, strerror(errno));
    return -1;
  }
  size_t cap = 4096, len = 0;
  uint8_t *buf = malloc(cap);
  size_t n;
  while (buf != NULL && (n = fread(buf + len, 1, cap - len, f)) > 0) {
    len += n;
    if (len == cap) {
      uint8_t *p = realloc(buf, cap *= 2);
      if (p == NULL) free(buf);
      buf = p;
    }
  }
  int bad = ferror(f);
  fclose(f);
  if (buf == NULL || bad) {
    fprintf(stderr, "%s: cannot read\n", path);
    free(buf);
    return -1;
  }
  /* An exact-size copy, so that ASan sees a read one byte past the input. */
  uint8_t *exact = malloc(len > 0 ? len : 1);
  if (exact == NULL) {
    free(buf);
    return -1;
  }
  memcpy(exact, buf, len);
  free(buf);
  SET_CURRENT(path);
  LLVMFuzzerTestOneInput(exact, len);
  free(exact);
  (*count)++;
  return 0;
}

static int cmp_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static int run_dir(const char *dir, size_t *count) {
  DIR *d = opendir(dir);
  if (d == NULL) {
    fprintf(stderr, "%s: %s\n", dir, strerror(errno));
    return -1;
  }
  char **names = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  int rc = 0;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    if (n == cap) {
      char **p = realloc(names, (cap = cap ? cap * 2 : 64) * sizeof *p);
      if (p == NULL) {
        rc = -1;
        break;
      }
      names = p;
    }
    size_t len = strlen(dir) + strlen(e->d_name) + 2;
    if ((names[n] = malloc(len)) == NULL) {
      rc = -1;
      break;
    }
    snprintf(names[n++], len, "%s/%s", dir, e->d_name);
  }
  closedir(d);
  if (n > 0) qsort(names, n, sizeof *names, cmp_names);
  for (size_t i = 0; i < n; i++) {
    struct stat st;
    if (rc == 0 && stat(names[i], &st) == 0 && S_ISREG(st.st_mode) && run_file(names[i], count) != 0)
      rc = -1;
    free(names[i]);
  }
  free(names);
  return rc;
}

int main(int argc, char **argv) {
  if (LLVMFuzzerInitialize != NULL) LLVMFuzzerInitialize(&argc, &argv);
  install_hook();
  size_t count = 0;
  int rc = 0;
  SET_CURRENT("(empty input)");
  LLVMFuzzerTestOneInput((const uint8_t *)"", 0);
  for (int i = 1; i < argc; i++) {
    if (argv[i][0] == '-') continue; /* libFuzzer flags: ignored by this driver */
    struct stat st;
    if (stat(argv[i], &st) != 0) {
      fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
      rc = 1;
    } else if (S_ISDIR(st.st_mode) ? run_dir(argv[i], &count) : run_file(argv[i], &count)) {
      rc = 1;
    }
  }
  printf("%s: %zu inputs replayed%s\n", argv[0], count, rc ? ", some could not be read" : "");
  if (count == 0 && rc == 0) {
    fprintf(stderr, "no input given: name corpus files or directories\n");
    rc = 1;
  }
  return rc;
}
