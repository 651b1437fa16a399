//! fuselab: reproducible FuseChat-3.0 implicit model fusion. The library holds all the machinery; the
//! `fuselab` binary is a thin CLI over it.

pub mod fs;
pub mod store;
pub mod util;
