//! What `run` needs to know, as a plain struct: main.rs fills it from flags and environment
//! variables, tests fill it directly.

pub use crate::store::StoreSpec;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the data lives.
    pub store: StoreSpec,
    /// The distributor to register the REST routes with; `None` serves without registering.
    pub distributor: Option<String>,
    /// The host other nodes should connect to, when the socket's address is not it.
    pub advertise_host: Option<String>,
}

impl Config {
    /// An unregistered service over `store` (tests).
    pub fn standalone(store: StoreSpec) -> Config {
        Config {
            store,
            distributor: None,
            advertise_host: None,
        }
    }
}
