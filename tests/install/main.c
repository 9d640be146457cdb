/* A downstream program, built against an installed libsaga by tests/check_install.sh. */
#include <stdio.h>
#include <string.h>

#include <saga.h>

int main(void) {
  printf("libsaga %s: %s\n", saga_version(), saga_strerror(SAGA_ENOMEM));
  /* The header and the library linked must be the same version. */
  return strcmp(saga_version(), SAGA_VERSION_STRING) == 0 ? 0 : 1;
}
