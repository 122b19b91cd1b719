//! What the Kafka sink is told by its flags, checked before anything starts, and the librdkafka settings it becomes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rdkafka::ClientConfig;

/// The topic records go to when `--kafka-topic` is not given.
pub const DEFAULT_TOPIC: &str = "flowlens-flows";
/// The environment variable the SASL password may come from (never a flag: `ps` shows those).
pub const PASSWORD_ENV: &str = "FLOWLENS_KAFKA_SASL_PASSWORD";

/// Settings flowlens gives librdkafka, before `--kafka-option`s (which may override any of
/// them but the ones [`Options`] refuses). Chosen for throughput with no loss: every replica
/// acknowledges, retries cannot duplicate or reorder, records wait up to 100 ms to fill
/// batches of up to 10,000, and an outage is bridged by up to 1 M records (256 MiB) for up
/// to 5 minutes before they count as lost.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("partitioner", "murmur2_random"),
    ("linger.ms", "100"),
    ("batch.num.messages", "10000"),
    ("batch.size", "1000000"),
    ("queue.buffering.max.messages", "1000000"),
    ("queue.buffering.max.kbytes", "262144"),
    ("message.timeout.ms", "300000"),
    ("statistics.interval.ms", "1000"),
    ("log.connection.close", "false"),
];

/// librdkafka settings `--kafka-option` may not set, and why.
const REFUSED: &[(&str, &str)] = &[
    (
        "sasl.password",
        "a flag's value is visible in `ps`: use --kafka-sasl-password-file or FLOWLENS_KAFKA_SASL_PASSWORD",
    ),
    (
        "ssl.key.password",
        "a flag's value is visible in `ps`: use an unencrypted key file readable by root only",
    ),
    (
        "bootstrap.servers",
        "the brokers are --kafka's value",
    ),
    (
        "delivery.report.only.error",
        "flowlens counts every delivered record from its delivery report",
    ),
    (
        "statistics.interval.ms",
        "the broker availability metrics are read from librdkafka's statistics every second",
    ),
];

/// `--kafka-compression`: librdkafka's `compression.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    #[default]
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("{s:?}: expected one of none, gzip, snappy, lz4, zstd"))
    }
}

/// `--kafka-sasl-mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// The name Kafka and librdkafka use.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SaslMechanism {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
        ]
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("{s:?}: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"))
    }
}

/// `--kafka BROKERS`: `host:port` entries, comma-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers(pub Vec<String>);

impl fmt::Display for Brokers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl FromStr for Brokers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for b in s.split(',').map(str::trim) {
            let (host, port) = b
                .rsplit_once(':')
                .ok_or_else(|| format!("{b:?}: expected HOST:PORT (e.g. kafka1:9092)"))?;
            let host_ok = !host.is_empty()
                && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
            if !host_ok {
                return Err(format!(
                    "{b:?}: expected HOST:PORT (an IPv6 address in brackets: [2001:db8::1]:9092)"
                ));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(format!("{b:?}: {port:?} is not a port (1-65535)")),
            }
            out.push(b.to_owned());
        }
        Ok(Brokers(out))
    }
}

/// `--kafka-option key=value`: any other librdkafka setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaOption {
    pub key: String,
    pub value: String,
}

impl FromStr for KafkaOption {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected KEY=VALUE (e.g. linger.ms=50)"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{s:?}: the key is empty"));
        }
        if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
            return Err(format!("{key} cannot be set here: {why}"));
        }
        Ok(KafkaOption {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// SASL: the mechanism, the user and where the password came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// TLS to the brokers: the CA bundle to trust (none: the system's), and a client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Everything the Kafka sink needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    pub brokers: Brokers,
    pub topic: String,
    pub compression: Compression,
    /// None: plaintext.
    pub tls: Option<Tls>,
    pub sasl: Option<Sasl>,
    /// Applied last: they override flowlens' own settings.
    pub options: Vec<KafkaOption>,
}

/// A flag combination or file that cannot work, named by its flag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--kafka-topic {0:?}: {1}")]
    Topic(String, &'static str),
    #[error("--kafka-tls-cert and --kafka-tls-key go together: {0} is missing")]
    HalfKeyPair(&'static str),
    #[error("{flag} {path}: {err}")]
    File {
        flag: &'static str,
        path: String,
        err: String,
    },
    #[error("--kafka-sasl-mechanism needs --kafka-sasl-username")]
    NoUsername,
    #[error("--kafka-sasl-username needs --kafka-sasl-mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")]
    NoMechanism,
    #[error(
        "SASL needs a password: --kafka-sasl-password-file FILE or the environment variable \
         {PASSWORD_ENV}"
    )]
    NoPassword,
    #[error("--kafka-sasl-password-file {0} and {PASSWORD_ENV} are both given: keep one")]
    TwoPasswords(String),
}

/// The flags as given, before the files are read.
#[derive(Debug, Clone, Default)]
pub struct KafkaFlags {
    pub brokers: Option<Brokers>,
    pub topic: String,
    pub compression: Compression,
    pub tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password_file: Option<PathBuf>,
    /// The value of [`PASSWORD_ENV`], if set.
    pub sasl_password_env: Option<String>,
    pub options: Vec<KafkaOption>,
}

impl KafkaFlags {
    /// The sink's configuration (None without `--kafka`), with the password read and every
    /// file checked for readability.
    pub fn resolve(self) -> Result<Option<KafkaConfig>, ConfigError> {
        let Some(brokers) = self.brokers else {
            return Ok(None);
        };
        check_topic(&self.topic)?;
        match (self.tls_cert.is_some(), self.tls_key.is_some()) {
            (true, false) => return Err(ConfigError::HalfKeyPair("--kafka-tls-key")),
            (false, true) => return Err(ConfigError::HalfKeyPair("--kafka-tls-cert")),
            _ => {}
        }
        for (flag, path) in [
            ("--kafka-tls-ca", &self.tls_ca),
            ("--kafka-tls-cert", &self.tls_cert),
            ("--kafka-tls-key", &self.tls_key),
        ] {
            if let Some(p) = path {
                readable(flag, p)?;
            }
        }
        let any_tls = self.tls || self.tls_ca.is_some() || self.tls_cert.is_some();
        let tls = any_tls.then_some(Tls {
            ca: self.tls_ca,
            cert: self.tls_cert,
            key: self.tls_key,
        });
        let sasl = match (self.sasl_mechanism, self.sasl_username) {
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::NoUsername),
            (None, Some(_)) => return Err(ConfigError::NoMechanism),
            (Some(mechanism), Some(username)) => {
                let password = match (self.sasl_password_file, self.sasl_password_env) {
                    (Some(f), Some(_)) => {
                        return Err(ConfigError::TwoPasswords(f.display().to_string()))
                    }
                    (Some(f), None) => {
                        let text = std::fs::read_to_string(&f).map_err(|e| ConfigError::File {
                            flag: "--kafka-sasl-password-file",
                            path: f.display().to_string(),
                            err: e.to_string(),
                        })?;
                        // One line; its newline is not part of the password.
                        text.strip_suffix('\n')
                            .map(|t| t.strip_suffix('\r').unwrap_or(t))
                            .unwrap_or(&text)
                            .to_owned()
                    }
                    (None, Some(p)) => p,
                    (None, None) => return Err(ConfigError::NoPassword),
                };
                if password.is_empty() {
                    return Err(ConfigError::NoPassword);
                }
                Some(Sasl {
                    mechanism,
                    username,
                    password,
                })
            }
        };
        Ok(Some(KafkaConfig {
            brokers,
            topic: self.topic,
            compression: self.compression,
            tls,
            sasl,
            options: self.options,
        }))
    }
}

/// Kafka's rule for topic names: 1-249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn check_topic(t: &str) -> Result<(), ConfigError> {
    let bad = |why| Err(ConfigError::Topic(t.to_owned(), why));
    if t.is_empty() || t.len() > 249 {
        return bad("a topic name has 1 to 249 characters");
    }
    if t == "." || t == ".." {
        return bad("\".\" and \"..\" are not topic names");
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("a topic name has only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn readable(flag: &'static str, p: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(p)
        .map(drop)
        .map_err(|e| ConfigError::File {
            flag,
            path: p.display().to_string(),
            err: e.to_string(),
        })
}

impl KafkaConfig {
    /// How the sink names itself to the hub and in logs: `kafka://BROKERS/TOPIC`.
    pub fn name(&self) -> String {
        format!("kafka://{}/{}", self.brokers, self.topic)
    }

    /// `security.protocol` for the TLS and SASL settings.
    pub fn security_protocol(&self) -> &'static str {
        match (self.tls.is_some(), self.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        }
    }

    /// The librdkafka configuration of the producer: [`DEFAULTS`], the flags, then the
    /// `--kafka-option`s. `client_id` names this host to the brokers.
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in DEFAULTS {
            c.set(*k, *v);
        }
        c.set("bootstrap.servers", self.brokers.to_string())
            .set("client.id", client_id)
            .set("compression.type", self.compression.as_str())
            .set("security.protocol", self.security_protocol());
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("ssl.ca.location", &tls.ca),
                ("ssl.certificate.location", &tls.cert),
                ("ssl.key.location", &tls.key),
            ] {
                if let Some(p) = path {
                    c.set(key, p.display().to_string());
                }
            }
        }
        if let Some(s) = &self.sasl {
            c.set("sasl.mechanisms", s.mechanism.as_str())
                .set("sasl.username", &s.username)
                .set("sasl.password", &s.password);
        }
        for o in &self.options {
            c.set(&o.key, &o.value);
        }
        c
    }

    /// A warning worth a log line at start, if the settings deserve one.
    pub fn warning(&self) -> Option<String> {
        let plain = self
            .sasl
            .as_ref()
            .is_some_and(|s| s.mechanism == SaslMechanism::Plain);
        let tls_off = self
            .options
            .iter()
            .rev()
            .find(|o| o.key == "security.protocol")
            .map_or(self.tls.is_none(), |o| {
                !o.value.to_ascii_lowercase().ends_with("ssl")
            });
        (plain && tls_off).then(|| {
            "Kafka: SASL PLAIN without TLS sends the password in cleartext to every broker; \
             add --kafka-tls (or --kafka-tls-ca)"
                .to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> KafkaFlags {
        KafkaFlags {
            brokers: Some("k1:9092".parse().unwrap()),
            topic: DEFAULT_TOPIC.into(),
            ..KafkaFlags::default()
        }
    }

    #[test]
    fn brokers_parse_host_port_lists() {
        let b: Brokers = "k1:9092, 10.0.0.1:9093,[2001:db8::1]:9094".parse().unwrap();
        assert_eq!(b.to_string(), "k1:9092,10.0.0.1:9093,[2001:db8::1]:9094");
        for bad in [
            "k1",
            "k1:",
            ":9092",
            "k1:0",
            "k1:99999",
            "2001:db8::1:9092",
            "k1:9092,",
        ] {
            assert!(bad.parse::<Brokers>().is_err(), "{bad}");
        }
    }

    #[test]
    fn options_refuse_secrets_and_what_the_sink_relies_on() {
        let o: KafkaOption = "linger.ms=5".parse().unwrap();
        assert_eq!((o.key.as_str(), o.value.as_str()), ("linger.ms", "5"));
        let e = "sasl.password=x".parse::<KafkaOption>().unwrap_err();
        assert!(e.contains("--kafka-sasl-password-file"), "{e}");
        assert!("delivery.report.only.error=true"
            .parse::<KafkaOption>()
            .is_err());
        assert!("linger.ms".parse::<KafkaOption>().is_err());
    }

    #[test]
    fn tls_and_sasl_choose_the_security_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let cfg = KafkaFlags {
            tls: true,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("flowlens".into()),
            sasl_password_file: Some(pw.clone()),
            ..flags()
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!(cfg.security_protocol(), "sasl_ssl");
        assert_eq!(cfg.sasl.as_ref().unwrap().password, "s3cret");
        assert!(!format!("{cfg:?}").contains("s3cret"));
        let c = cfg.client_config("h");
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("partitioner"), Some("murmur2_random"));

        let plain = KafkaFlags {
            sasl_mechanism: Some(SaslMechanism::Plain),
            sasl_username: Some("u".into()),
            sasl_password_env: Some("p".into()),
            ..flags()
        }
        .resolve()
        .unwrap()
        .unwrap();
        assert_eq!(plain.security_protocol(), "sasl_plaintext");
        assert!(plain.warning().is_some());
    }

    #[test]
    fn bad_combinations_name_their_flags() {
        let err = |f: KafkaFlags| f.resolve().unwrap_err().to_string();
        assert!(err(KafkaFlags {
            tls_cert: Some("/etc/hostname".into()),
            ..flags()
        })
        .contains("--kafka-tls-key is missing"));
        assert!(err(KafkaFlags {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..flags()
        })
        .starts_with("--kafka-tls-ca /nonexistent/ca.pem: "));
        assert!(err(KafkaFlags {
            sasl_mechanism: Some(SaslMechanism::Plain),
            ..flags()
        })
        .contains("--kafka-sasl-username"));
        assert!(err(KafkaFlags {
            sasl_mechanism: Some(SaslMechanism::Plain),
            sasl_username: Some("u".into()),
            ..flags()
        })
        .contains(PASSWORD_ENV));
        assert!(err(KafkaFlags {
            topic: "a/b".into(),
            ..flags()
        })
        .starts_with("--kafka-topic \"a/b\""));
        assert_eq!(
            KafkaFlags {
                brokers: None,
                ..flags()
            }
            .resolve(),
            Ok(None)
        );
    }
}
