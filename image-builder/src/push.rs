//! Pushing an OCI layout to a registry with the OCI distribution API
//! (monolithic blob uploads: POST, then one PUT with the whole blob).
//!
//! Plain HTTP only for now, and only when the caller says `--insecure`:
//! the build has no TLS stack yet, and pushing silently in clear text to a
//! name that looks like a public registry would be a surprise.

use crate::oci::{Descriptor, Layout, OciError};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Largest error body quoted in an error message.
const MAX_ERROR_BODY: u64 = 16 * 1024;

/// Errors parsing a push target.
#[derive(Debug, thiserror::Error)]
#[error("invalid target {target:?}: {reason} (expected HOST[:PORT]/REPO[:TAG])")]
pub struct TargetError {
    /// The target as given.
    pub target: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Errors pushing.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Only plain HTTP is implemented.
    #[error(
        "pushing to {0} over HTTPS is not supported yet; pass --insecure to push over plain HTTP"
    )]
    HttpsUnsupported(String),
    /// The layout is unreadable or inconsistent.
    #[error(transparent)]
    Layout(#[from] OciError),
    /// The request did not complete (connection refused, timeout...).
    #[error("{step}")]
    Transport {
        /// What was being done.
        step: String,
        /// Cause.
        source: Box<ureq::Error>,
    },
    /// The registry answered with an unexpected status.
    #[error("{step}: HTTP {status}: {body}")]
    Status {
        /// What was being done.
        step: String,
        /// HTTP status.
        status: u16,
        /// The response body (truncated).
        body: String,
    },
    /// The registry answered something that breaks the protocol.
    #[error("{step}: {reason}")]
    Protocol {
        /// What was being done.
        step: String,
        /// What is wrong.
        reason: String,
    },
}

/// Where to push: `HOST[:PORT]/REPO[:TAG]` (the tag defaults to `latest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub registry: String,
    /// Repository name (`demo/hello`).
    pub repository: String,
    /// Tag.
    pub tag: String,
}

impl FromStr for Target {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| TargetError {
            target: s.to_string(),
            reason,
        };
        if s.contains("://") {
            return Err(bad("no scheme: the registry is HOST[:PORT]"));
        }
        if s.contains('@') {
            return Err(bad("push by digest is not supported, give a tag"));
        }
        let (registry, rest) = s.split_once('/').ok_or_else(|| bad("no repository"))?;
        if registry.is_empty()
            || !registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        {
            return Err(bad("bad registry host"));
        }
        // A ':' after the last '/' starts the tag.
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, t),
            _ => (rest, "latest"),
        };
        if !valid_repository(repository) {
            return Err(bad(
                "repository must be lowercase path components of [a-z0-9] joined by . _ - or /",
            ));
        }
        if !valid_tag(tag) {
            return Err(bad("tag must match [A-Za-z0-9_][A-Za-z0-9._-]{0,127}"));
        }
        Ok(Target {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.to_string(),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

/// The distribution spec's repository grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.split('/').all(|component| {
            let b = component.as_bytes();
            let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
                return false;
            }
            let mut i = 0;
            while i < b.len() {
                if alnum(b[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < b.len() && !alnum(b[i]) {
                    i += 1;
                }
                let sep = &component[start..i];
                if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
                    return false;
                }
            }
            true
        })
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Resolves an upload `Location` against the registry base URL and the URL
/// of the request that returned it (RFC 3986 reference resolution, for the
/// forms registries use: absolute, host-relative, path-relative).
pub fn resolve_location(base: &str, request_path: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("http://{rest}")
    } else if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        let dir = request_path.rfind('/').map_or("/", |i| &request_path[..=i]);
        format!("{base}{dir}{location}")
    }
}

/// Appends `digest=<digest>` to an upload URL's query.
pub fn with_digest(url: &str, digest: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}digest={digest}")
}

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobStatus {
    /// The registry already had it (HEAD 200).
    Exists,
    /// Uploaded.
    Uploaded,
}

/// One blob pushed.
#[derive(Debug, Clone)]
pub struct BlobReport {
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// What happened.
    pub status: BlobStatus,
}

/// The result of a push.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Layers then config.
    pub blobs: Vec<BlobReport>,
    /// The manifest's digest (`sha256:...`).
    pub manifest_digest: String,
    /// Whether the registry confirmed it with `Docker-Content-Digest`.
    pub digest_confirmed: bool,
}

/// An HTTP client for one repository of one registry.
struct Registry {
    agent: ureq::Agent,
    base: String,
    repo: String,
}

type Response = ureq::http::Response<ureq::Body>;

impl Registry {
    fn new(registry: &str, repo: &str) -> Registry {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .user_agent(concat!("cairn-image/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Registry {
            agent,
            base: format!("http://{registry}"),
            repo: repo.to_string(),
        }
    }

    fn transport(step: &str) -> impl FnOnce(ureq::Error) -> PushError + '_ {
        move |e| PushError::Transport {
            step: step.to_string(),
            source: Box::new(e),
        }
    }

    /// Fails unless the status is one of `ok`, quoting the body.
    fn expect(step: &str, mut resp: Response, ok: &[u16]) -> Result<Response, PushError> {
        let status = resp.status().as_u16();
        if ok.contains(&status) {
            return Ok(resp);
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_BODY)
            .lossy_utf8(true)
            .read_to_string()
            .unwrap_or_default();
        Err(PushError::Status {
            step: step.to_string(),
            status,
            body: body.trim().to_string(),
        })
    }

    fn header<'r>(resp: &'r Response, name: &str) -> Option<&'r str> {
        resp.headers().get(name).and_then(|v| v.to_str().ok())
    }

    fn ping(&self) -> Result<(), PushError> {
        let url = format!("{}/v2/", self.base);
        let step = format!("checking the registry API (GET {url})");
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(Self::transport(&step))?;
        Self::expect(&step, resp, &[200]).map(drop)
    }

    fn push_blob(&self, desc: &Descriptor, bytes: &[u8]) -> Result<BlobStatus, PushError> {
        let digest = &desc.digest;
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repo);
        let step = format!("checking blob {digest} (HEAD {url})");
        let resp = self
            .agent
            .head(&url)
            .call()
            .map_err(Self::transport(&step))?;
        let resp = Self::expect(&step, resp, &[200, 404])?;
        if resp.status().as_u16() == 200 {
            return Ok(BlobStatus::Exists);
        }

        let path = format!("/v2/{}/blobs/uploads/", self.repo);
        let url = format!("{}{path}", self.base);
        let step = format!("starting the upload of {digest} (POST {url})");
        let resp = self
            .agent
            .post(&url)
            .send_empty()
            .map_err(Self::transport(&step))?;
        let resp = Self::expect(&step, resp, &[202])?;
        let location = Self::header(&resp, "location").ok_or_else(|| PushError::Protocol {
            step: step.clone(),
            reason: "202 without a Location header".into(),
        })?;
        let upload = with_digest(&resolve_location(&self.base, &path, location), digest);

        let step = format!("uploading {digest} ({} bytes, PUT {upload})", bytes.len());
        let resp = self
            .agent
            .put(&upload)
            .header("Content-Type", "application/octet-stream")
            .send(bytes)
            .map_err(Self::transport(&step))?;
        let resp = Self::expect(&step, resp, &[201])?;
        if let Some(got) = Self::header(&resp, "docker-content-digest") {
            if got != digest {
                return Err(PushError::Protocol {
                    step,
                    reason: format!("the registry stored digest {got}"),
                });
            }
        }
        Ok(BlobStatus::Uploaded)
    }

    /// PUTs the manifest; returns the `Docker-Content-Digest` answer.
    fn push_manifest(
        &self,
        tag: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Option<String>, PushError> {
        let url = format!("{}/v2/{}/manifests/{tag}", self.base, self.repo);
        let step = format!("putting the manifest (PUT {url})");
        let resp = self
            .agent
            .put(&url)
            .header("Content-Type", media_type)
            .send(bytes)
            .map_err(Self::transport(&step))?;
        let resp = Self::expect(&step, resp, &[201])?;
        Ok(Self::header(&resp, "docker-content-digest").map(str::to_string))
    }
}

/// Pushes the image of `layout` (its only image manifest, or the one named
/// like the target's tag) to `target`: blobs the registry lacks, then the
/// manifest under the tag. Every blob is checked against its digest before
/// it leaves. `insecure` must be true: only plain HTTP is implemented.
pub fn push(layout: &Layout, target: &Target, insecure: bool) -> Result<Pushed, PushError> {
    if !insecure {
        return Err(PushError::HttpsUnsupported(target.registry.clone()));
    }
    let image = layout.image(&target.tag)?;
    let registry = Registry::new(&target.registry, &target.repository);
    registry.ping()?;

    let mut blobs = Vec::new();
    let manifest = &image.manifest;
    for desc in manifest
        .layers
        .iter()
        .chain(std::iter::once(&manifest.config))
    {
        let bytes = layout.read_blob(desc)?;
        let status = registry.push_blob(desc, &bytes)?;
        blobs.push(BlobReport {
            digest: desc.digest.clone(),
            size: desc.size,
            status,
        });
    }

    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| image.descriptor.media_type.clone());
    let manifest_digest = image.descriptor.digest.clone();
    let answered = registry.push_manifest(&target.tag, &media_type, &image.bytes)?;
    let digest_confirmed = match answered {
        Some(d) if d == manifest_digest => true,
        Some(d) => {
            return Err(PushError::Protocol {
                step: format!("putting the manifest of {target}"),
                reason: format!(
                    "the registry answered Docker-Content-Digest {d}, we sent {manifest_digest}"
                ),
            })
        }
        None => false,
    };
    Ok(Pushed {
        blobs,
        manifest_digest,
        digest_confirmed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t: Target = "127.0.0.1:5000/demo/hello:v1".parse().unwrap();
        assert_eq!(
            t,
            Target {
                registry: "127.0.0.1:5000".into(),
                repository: "demo/hello".into(),
                tag: "v1".into()
            }
        );
        assert_eq!(t.to_string(), "127.0.0.1:5000/demo/hello:v1");
        let t: Target = "localhost/hello".parse().unwrap();
        assert_eq!(
            (t.registry.as_str(), t.tag.as_str()),
            ("localhost", "latest")
        );
        for bad in [
            "hello",
            "http://h:1/r:t",
            "h:1/Upper:t",
            "h:1/r@sha256:00",
            "h:1/r:-t",
            "h:1/a//b:t",
            "h:1/a-:t",
            "/r:t",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
        assert!(valid_repository("a__b/c.d/e---f"));
        assert!(!valid_repository("a___b"));
    }

    #[test]
    fn locations_resolve() {
        let base = "http://127.0.0.1:5000";
        let req = "/v2/r/blobs/uploads/";
        assert_eq!(
            resolve_location(base, req, "/v2/r/blobs/uploads/abc?_state=x"),
            "http://127.0.0.1:5000/v2/r/blobs/uploads/abc?_state=x"
        );
        assert_eq!(
            resolve_location(base, req, "http://other:1/u/1"),
            "http://other:1/u/1"
        );
        assert_eq!(
            resolve_location(base, req, "abc"),
            "http://127.0.0.1:5000/v2/r/blobs/uploads/abc"
        );
        assert_eq!(
            with_digest("http://h/u?a=1", "sha256:00"),
            "http://h/u?a=1&digest=sha256:00"
        );
        assert_eq!(
            with_digest("http://h/u", "sha256:00"),
            "http://h/u?digest=sha256:00"
        );
    }

    #[test]
    fn https_is_refused_without_insecure() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::write(&bin, b"\x7fELF fake").unwrap();
        let spec = crate::oci::Spec {
            binary: bin,
            name: "hello".into(),
            port: 80,
            epoch: 0,
        };
        let out = tmp.path().join("layout");
        crate::oci::build(&spec, &out).unwrap();
        let layout = Layout::open(&out).unwrap();
        let t: Target = "example.com/x:y".parse().unwrap();
        let e = push(&layout, &t, false).unwrap_err();
        assert!(e.to_string().contains("HTTPS is not supported yet"), "{e}");
    }
}
