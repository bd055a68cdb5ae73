//! kpr: a kube-proxy replacement on eBPF.
//!
//! A source (the Kubernetes API, or a manifest directory) yields Services
//! and EndpointSlices; the pure [`model`] turns them into the desired
//! frontends and backends; the [`sync`] writes only the differences into the
//! BPF maps; the programs in `proxy-ebpf` read them per packet.
pub mod cleanup;
pub mod daemon;
pub mod dataplane;
pub mod healthcheck;
pub mod inspect;
pub mod memory;
pub mod model;
pub mod packet;
pub mod source;
pub mod sync;
pub mod telemetry;
