/* The transport conformance kit (include/saga/conformance.h). */
#include "../internal.h"
#include "saga/conformance.h"

int saga_conformance_run(struct uv_loop_s *loop, const saga_conformance_medium *m, char *report,
                         size_t reportlen) {
  (void)loop;
  (void)m;
  saga__errf(report, reportlen, "conformance kit not implemented yet\n");
  return SAGA_EINVAL;
}
