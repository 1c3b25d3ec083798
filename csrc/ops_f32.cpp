// The float instances of the kernels (kernels.h).
#include "kernels.h"

namespace pk {
PK_INSTANTIATE(float)
}  // namespace pk
