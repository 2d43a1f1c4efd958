// A no-op XLA FFI handler whose one result aliases its one operand (jaxconv.ops.barrier): XLA
// cannot fuse across a custom call, so the value it passes is computed once and read from
// memory by every consumer. The buffer already holds the value; there is nothing to do.
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error Barrier(ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvFusionBarrier, Barrier,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
