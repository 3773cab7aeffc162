//! Who an Envoy is allowed to be, from its client certificate: plain rules, no TLS or gRPC types.
//!
//! An Envoy's certificate names what it may speak for in URI SANs shaped like SPIFFE ids:
//! - `spiffe://<trust domain>/envoy/<cluster>/<node id>`: that one Envoy (node id and cluster both match);
//! - `spiffe://<trust domain>/envoy/<cluster>`: any node id of that cluster (one certificate per cluster).
//!
//! Segments are percent-decoded, so a node id with `/` or spaces can be named. Other URIs (and DNS names)
//! name nothing here. With a trust domain configured, only ids in it count.

use std::fmt;

use percent_encoding::percent_decode_str;

const SCHEME: &str = "spiffe://";
const PATH_ROOT: &str = "envoy";

/// One thing a certificate allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The URI SAN it comes from.
    pub uri: String,
    pub cluster: String,
    /// `None`: any node id of the cluster.
    pub node_id: Option<String>,
}

/// What a verified client certificate allows, and how to name it in messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertIdentity {
    /// The certificate's URI SANs, as written (shown in refusals and the fleet view).
    pub uris: Vec<String>,
    /// The ones that are grants (in the trust domain, shaped as above).
    pub grants: Vec<Grant>,
}

/// Why a node was refused for a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub node_id: String,
    pub cluster: String,
    pub uris: Vec<String>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = if self.uris.is_empty() {
            "none".to_string()
        } else {
            self.uris.join(", ")
        };
        write!(
            f,
            "node {} (cluster {}) is not named by its certificate (URI SANs: {names})",
            canary_router::text::quote(&self.node_id),
            canary_router::text::quote(&self.cluster),
        )
    }
}

impl CertIdentity {
    /// The grants among `uris`; with `trust_domain`, only ids in that domain (compared in ASCII lower case,
    /// as SPIFFE trust domains are).
    pub fn from_uris(uris: Vec<String>, trust_domain: Option<&str>) -> Self {
        let grants = uris
            .iter()
            .filter_map(|uri| grant(uri, trust_domain))
            .collect();
        Self { uris, grants }
    }

    /// Ok when some grant covers this node id and cluster.
    pub fn permits(&self, node_id: &str, cluster: &str) -> Result<(), Mismatch> {
        if self.granting_uri(node_id, cluster).is_some() {
            Ok(())
        } else {
            Err(Mismatch {
                node_id: node_id.to_string(),
                cluster: cluster.to_string(),
                uris: self.uris.clone(),
            })
        }
    }

    /// The URI that allows this node (for the fleet view).
    pub fn granting_uri(&self, node_id: &str, cluster: &str) -> Option<&str> {
        if node_id.is_empty() {
            return None;
        }
        self.grants
            .iter()
            .find(|g| {
                g.cluster == cluster
                    && match &g.node_id {
                        None => true,
                        Some(id) => id == node_id,
                    }
            })
            .map(|g| g.uri.as_str())
    }
}

fn grant(uri: &str, trust_domain: Option<&str>) -> Option<Grant> {
    let rest = uri
        .get(..SCHEME.len())
        .filter(|s| s.eq_ignore_ascii_case(SCHEME))
        .map(|_| &uri[SCHEME.len()..])?;
    let (domain, path) = rest.split_once('/')?;
    if domain.is_empty() || trust_domain.is_some_and(|td| !td.eq_ignore_ascii_case(domain)) {
        return None;
    }
    let segments: Vec<&str> = path.split('/').collect();
    let decode = |s: &str| -> Option<String> {
        let text = percent_decode_str(s).decode_utf8().ok()?.into_owned();
        (!text.is_empty()).then_some(text)
    };
    match segments.as_slice() {
        [root, cluster] if *root == PATH_ROOT => Some(Grant {
            uri: uri.to_string(),
            cluster: decode(cluster)?,
            node_id: None,
        }),
        [root, cluster, node] if *root == PATH_ROOT => Some(Grant {
            uri: uri.to_string(),
            cluster: decode(cluster)?,
            node_id: Some(decode(node)?),
        }),
        _ => None,
    }
}

/// The URI SANs of a DER certificate (the leaf an Envoy presented; already verified against the CA).
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|err| format!("cannot read the certificate: {err}"))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push((*uri).to_string());
            }
        }
    }
    Ok(uris)
}

/// A certificate's subject and the end of its validity (unix seconds), for logs and `/metrics`.
pub fn describe(der: &[u8]) -> Result<(String, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|err| format!("cannot read the certificate: {err}"))?;
    Ok((
        cert.subject().to_string(),
        cert.validity().not_after.timestamp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(uris: &[&str], trust_domain: Option<&str>) -> CertIdentity {
        CertIdentity::from_uris(uris.iter().map(|s| s.to_string()).collect(), trust_domain)
    }

    #[test]
    fn a_per_envoy_certificate_allows_that_node_in_that_cluster_only() {
        let id = identity(&["spiffe://fleet.example/envoy/edge/front-1"], None);
        assert!(id.permits("front-1", "edge").is_ok());
        assert!(id.permits("front-2", "edge").is_err());
        assert!(id.permits("front-1", "other").is_err());
        assert!(id.permits("", "edge").is_err());
    }

    #[test]
    fn a_per_cluster_certificate_allows_any_node_of_the_cluster() {
        let id = identity(&["spiffe://fleet.example/envoy/edge"], None);
        assert!(id.permits("front-1", "edge").is_ok());
        assert!(id.permits("front-9", "edge").is_ok());
        assert!(id.permits("front-1", "edge2").is_err());
        assert!(id.permits("", "edge").is_err());
    }

    #[test]
    fn only_the_shape_and_the_trust_domain_count() {
        for uri in [
            "spiffe://fleet.example/ns/default/sa/envoy", // a workload id, not ours
            "spiffe://fleet.example/envoy",               // no cluster
            "spiffe://fleet.example/envoy//front-1",      // empty cluster
            "spiffe://fleet.example/envoy/edge/front-1/x",
            "https://fleet.example/envoy/edge/front-1",
            "spiffe:///envoy/edge/front-1",
            "edge/front-1",
        ] {
            assert_eq!(identity(&[uri], None).grants, vec![], "{uri}");
        }
        let uri = "spiffe://Fleet.Example/envoy/edge/front-1";
        assert!(identity(&[uri], Some("fleet.example"))
            .permits("front-1", "edge")
            .is_ok());
        assert!(identity(&[uri], Some("other.example"))
            .permits("front-1", "edge")
            .is_err());
    }

    #[test]
    fn segments_are_percent_decoded_and_compared_exactly() {
        let id = identity(&["spiffe://td/envoy/edge%20eu/pod%2F7"], None);
        assert!(id.permits("pod/7", "edge eu").is_ok());
        assert!(id.permits("pod%2F7", "edge eu").is_err());
        assert!(id.permits("Pod/7", "edge eu").is_err());
    }

    #[test]
    fn a_mismatch_names_both_sides_in_one_line() {
        let id = identity(
            &[
                "spiffe://td/envoy/edge/front-1",
                "spiffe://td/envoy/edge/front-2",
            ],
            None,
        );
        let err = id.permits("front-3", "edge").unwrap_err().to_string();
        assert_eq!(
            err,
            "node \"front-3\" (cluster \"edge\") is not named by its certificate (URI SANs: \
             spiffe://td/envoy/edge/front-1, spiffe://td/envoy/edge/front-2)"
        );
        let none = identity(&[], None)
            .permits("a", "b")
            .unwrap_err()
            .to_string();
        assert!(none.ends_with("(URI SANs: none)"), "{none}");
        assert_eq!(
            id.granting_uri("front-2", "edge"),
            Some("spiffe://td/envoy/edge/front-2")
        );
    }
}
