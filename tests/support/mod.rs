//! Shared test support: real processes and real sockets, no protocol mocks.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod modsrv;
pub mod registry;
pub mod res;
pub mod xds;

pub use agent::{free_port, metric_value, Agent};
pub use modsrv::{ModuleServer, Route};
pub use registry::{Layout, Registry};
pub use xds::{ControlPlane, CpStream};
