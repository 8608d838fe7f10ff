//! How a step trusts a BMC's TLS certificate: the usual way (a chain to a
//! public root, for the BMC's host name), a pinned SHA-256 of the BMC's own
//! certificate (most BMCs carry a self-signed one), or not at all where the
//! operator says so.
//!
//! A pin is checked in ureq's connector chain, on the connection the
//! requests go over, by a rustls verifier of our own: the certificate's
//! digest must match and the handshake must be signed by its key. The host
//! name is not checked against a pinned certificate (self-signed BMC
//! certificates rarely name the address they are reached at).

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, TcpConnector,
    Transport, TransportAdapter,
};

/// How the BMC's certificate is trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Trust {
    /// A chain to a public root, for the host name in the URL.
    Verified,
    /// Exactly this certificate (the SHA-256 of its DER form).
    Pinned([u8; 32]),
    /// Anything: set by the operator for one BMC, never by a request.
    Insecure,
}

impl Trust {
    /// `sha256:AB:CD…` or `sha256:abcd…` (what `openssl x509 -fingerprint
    /// -sha256` prints, with or without colons), or `insecure`.
    pub(crate) fn parse(text: &str) -> Result<Trust, String> {
        if text == "insecure" {
            return Ok(Trust::Insecure);
        }
        let Some(hex) = text.strip_prefix("sha256:") else {
            return Err(format!(
                "`{text}` is neither sha256:HEX (the certificate's SHA-256) nor insecure"
            ));
        };
        let hex: String = hex.chars().filter(|c| *c != ':').collect();
        let bad = || format!("sha256:{hex} is not 64 hexadecimal digits");
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut pin = [0u8; 32];
        for (i, byte) in pin.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Trust::Pinned(pin))
    }
}

/// An HTTP agent for one BMC: statuses are returned, not errors; each call
/// is bounded by `timeout`.
pub(crate) fn agent(trust: &Trust, timeout: Duration) -> ureq::Agent {
    let mut tls = ureq::tls::TlsConfig::builder();
    if *trust == Trust::Insecure {
        tls = tls.disable_verification(true);
    }
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .tls_config(tls.build())
        // A BMC is reached directly, never through a proxy from the
        // environment, and a redirect is not followed (the credentials
        // would go with it).
        .proxy(None)
        .max_redirects(0)
        .build();
    match trust {
        Trust::Pinned(pin) => {
            let connector = ().chain(TcpConnector::default()).chain(PinnedTls::new(*pin));
            ureq::Agent::with_parts(config, connector, DefaultResolver::default())
        }
        _ => config.into(),
    }
}

/// Wraps the TCP connection in TLS that accepts only the pinned certificate.
struct PinnedTls {
    config: Arc<ClientConfig>,
}

impl PinnedTls {
    fn new(pin: [u8; 32]) -> PinnedTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = PinVerifier {
            pin,
            algorithms: provider.signature_verification_algorithms,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        PinnedTls {
            config: Arc::new(config),
        }
    }
}

impl fmt::Debug for PinnedTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinnedTls")
    }
}

impl<In: Transport> Connector<In> for PinnedTls {
    type Out = Either<In, PinnedTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details
            .uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| ureq::Error::Tls("the BMC's host is not a valid TLS server name"))?;
        let mut conn = ClientConnection::new(self.config.clone(), name)?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock)?;
        Ok(Some(Either::B(PinnedTransport {
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            stream: StreamOwned { conn, sock },
        })))
    }
}

struct PinnedTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl fmt::Debug for PinnedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinnedTransport")
    }
}

impl Transport for PinnedTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the certificate's SHA-256 is {}, not the pinned one",
                hex(&digest)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `AB:CD:…`, as openssl prints a fingerprint.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let colons = "sha256:".to_owned() + &["AB"; 32].join(":");
        assert_eq!(Trust::parse(&colons), Ok(Trust::Pinned([0xAB; 32])));
        let plain = "sha256:".to_owned() + &"ab".repeat(32);
        assert_eq!(Trust::parse(&plain), Ok(Trust::Pinned([0xAB; 32])));
        assert_eq!(Trust::parse("insecure"), Ok(Trust::Insecure));
        assert!(Trust::parse("sha256:abcd").is_err());
        assert!(Trust::parse("md5:ab").is_err());
    }
}
