//! The CPU JIT target. Upstream this is an ORC/LLJIT engine; here the engine type exists only
//! so that [`PlironArtifact::Jit`](crate::PlironArtifact::Jit) keeps its upstream shape. It is
//! uninhabited: no value of it can ever be made.

use cubecl_core::ir::attributes::BufferIOAttr;

/// A JIT-compiled CPU kernel. Uninhabited in this stub.
#[derive(Clone, Debug)]
pub struct PlironEngine {
    never: core::convert::Infallible,
}

impl PlironEngine {
    /// Buffer access modes in binding order.
    pub fn buffer_io(&self) -> &[BufferIOAttr] {
        match self.never {}
    }
}

impl core::fmt::Display for PlironEngine {
    fn fmt(&self, _f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.never {}
    }
}
