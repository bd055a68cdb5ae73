//! The per-service health check servers of externalTrafficPolicy Local
//! services (kube-proxy's `pkg/proxy/healthcheck`): on each
//! `healthCheckNodePort`, every node answers whether it has a ready endpoint
//! of the service, so an external load balancer sends traffic only to nodes
//! that will not drop it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, Router};
use tokio::task::JoinHandle;

use crate::{model::HealthCheck, telemetry::Telemetry};

/// The answer of one server, swapped in place as endpoints change.
type Answers = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

pub struct HealthCheckServers {
    answers: Answers,
    servers: BTreeMap<u16, JoinHandle<()>>,
    /// Ports that could not be bound, reported once each; tried again on
    /// every update.
    unbindable: BTreeSet<u16>,
    telemetry: Arc<Telemetry>,
}

/// kube-proxy's body: `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":B}`.
/// In kube-proxy's key order.
pub fn body(check: &HealthCheck, proxy_healthy: bool) -> String {
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        r#"{{"service":{{"namespace":{},"name":{}}},"localEndpoints":{},"serviceProxyHealthy":{proxy_healthy}}}"#,
        quoted(&check.service.namespace),
        quoted(&check.service.name),
        check.local_endpoints
    )
}

impl HealthCheckServers {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        HealthCheckServers {
            answers: Answers::default(),
            servers: BTreeMap::new(),
            unbindable: BTreeSet::new(),
            telemetry,
        }
    }

    /// Runs exactly the servers `checks` asks for, answering with their
    /// current counts. Two services asking for one port: the first keeps it
    /// (the API server never allocates one port twice).
    pub fn update(&mut self, checks: Vec<HealthCheck>) {
        let mut wanted: BTreeMap<u16, HealthCheck> = BTreeMap::new();
        for check in checks {
            wanted.entry(check.port).or_insert(check);
        }
        for (port, server) in std::mem::take(&mut self.servers) {
            if wanted.contains_key(&port) {
                self.servers.insert(port, server);
            } else {
                server.abort();
                tracing::info!(port, "health check server stopped");
            }
        }
        self.unbindable.retain(|p| wanted.contains_key(p));
        for (&port, check) in &wanted {
            if self.servers.contains_key(&port) {
                continue;
            }
            match self.start(port) {
                Ok(server) => {
                    self.unbindable.remove(&port);
                    tracing::info!(port, service = %check.service, "health check server started");
                    self.servers.insert(port, server);
                }
                Err(e) => {
                    if self.unbindable.insert(port) {
                        tracing::warn!(
                            port,
                            service = %check.service,
                            error = %e,
                            "cannot serve the service's healthCheckNodePort; will retry"
                        );
                    }
                }
            }
        }
        *self.answers.lock().expect("answers lock") = wanted;
    }

    fn start(&self, port: u16) -> std::io::Result<JoinHandle<()>> {
        let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = Router::new()
            .fallback(answer)
            .with_state((port, self.answers.clone(), self.telemetry.clone()));
        Ok(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }))
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.abort();
        }
    }
}

/// Any path, as kube-proxy: 200 with N > 0 local ready endpoints and a
/// healthy proxy, 503 otherwise, the same body either way.
async fn answer(State((port, answers, telemetry)): State<(u16, Answers, Arc<Telemetry>)>) -> impl IntoResponse {
    let Some(check) = answers.lock().expect("answers lock").get(&port).cloned() else {
        return (StatusCode::NOT_FOUND, [("content-type", "text/plain")], String::new());
    };
    let healthy = telemetry.health.lock().expect("health lock").healthy();
    let status = if check.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], body(&check, healthy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::objects::ObjectName;

    #[test]
    fn body_has_kube_proxys_shape() {
        let check = HealthCheck {
            service: ObjectName {
                namespace: "web".into(),
                name: "nginx".into(),
            },
            port: 32000,
            local_endpoints: 2,
        };
        assert_eq!(
            body(&check, true),
            r#"{"service":{"namespace":"web","name":"nginx"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
    }
}
