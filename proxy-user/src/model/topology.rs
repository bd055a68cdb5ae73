//! Which endpoints of a service port may receive new connections: the one
//! place where endpoint-selection rules live (kube-proxy's topology.go).
use super::objects::EndpointInfo;

/// Ready endpoints; when none is ready, those that are still serving while
/// terminating, so that a service being rolled keeps answering.
/// `info` tells the conditions of each candidate.
pub fn usable_endpoints<'e, T: Copy>(candidates: &[T], info: impl Fn(T) -> &'e EndpointInfo) -> Vec<T> {
    let ready: Vec<T> = candidates.iter().copied().filter(|&c| info(c).ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates
        .iter()
        .copied()
        .filter(|&c| {
            let e = info(c);
            e.serving && e.terminating
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: u8, ready: bool, serving: bool, terminating: bool) -> EndpointInfo {
        EndpointInfo {
            addresses: vec![std::net::Ipv4Addr::new(10, 0, 0, id)],
            ready,
            serving,
            terminating,
            node_name: None,
        }
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            endpoints: Vec<EndpointInfo>,
            want: Vec<u8>,
        }
        let cases = [
            Case {
                name: "no endpoints",
                endpoints: vec![],
                want: vec![],
            },
            Case {
                name: "all ready",
                endpoints: vec![ep(1, true, true, false), ep(2, true, true, false)],
                want: vec![1, 2],
            },
            Case {
                name: "ready ones win over serving-terminating ones",
                endpoints: vec![ep(1, true, true, false), ep(2, false, true, true)],
                want: vec![1],
            },
            Case {
                name: "none ready: fall back to serving and terminating",
                endpoints: vec![
                    ep(1, false, true, true),
                    ep(2, false, false, true),
                    ep(3, false, true, true),
                ],
                want: vec![1, 3],
            },
            Case {
                name: "not ready and not terminating is never used",
                endpoints: vec![ep(1, false, true, false), ep(2, false, false, false)],
                want: vec![],
            },
            Case {
                name: "terminating but not serving is never used",
                endpoints: vec![ep(1, false, false, true)],
                want: vec![],
            },
        ];
        for case in cases {
            let refs: Vec<_> = case.endpoints.iter().collect();
            let got: Vec<u8> = usable_endpoints(&refs, |e| e)
                .iter()
                .map(|e| e.addresses[0].octets()[3])
                .collect();
            assert_eq!(got, case.want, "{}", case.name);
        }
    }
}
