// The double instances of the kernels (kernels.h).
#include "kernels.h"

namespace pk {
PK_INSTANTIATE(double)
}  // namespace pk
