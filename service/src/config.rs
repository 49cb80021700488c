//! Layered configuration: a TOML file plus `UPLINK_<SERVICE>_…` environment overrides (`__`
//! nests), read with figment, and problems reported with where the bad value was set.
//!
//! [`Layers`] reads the sources; [`Layers::extract`] turns figment's errors (TOML syntax,
//! unknown fields, wrong types, missing fields) and [`Layers::locate`] turns a service's own
//! validation [`Problem`]s into a [`Report`], one line per problem:
//!
//! ```text
//! agent.toml:12:1: mqtt.port: invalid type: found string "x", expected u16
//! UPLINK_AGENT_CONCURRENCY (environment): concurrency: 0 is outside 1..=64
//! ```
//!
//! [`position`] maps a key path to its line and column in TOML text, using the spans
//! `toml_edit` keeps. [`Secret`] wraps values that must never print.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::providers::{Env, Format as _, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::{DeserializeOwned, Deserializer};
use toml_edit::{ImDocument, Item, TableLike, Value};

/// A string that never prints (passwords, tokens, URLs with credentials): `Debug` and
/// `Display` show `[redacted]`, and it has no `Serialize`. It reads any scalar, so
/// `UPLINK_…_TOKEN=1234` (which figment reads as a number) works, and a wrong type can
/// never echo the value in an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Secret)
    }
}

/// Reads a string, also accepting a number or a boolean: environment values such as
/// `UPLINK_BRIDGE_API_TOKEN=1234` arrive as numbers. Use with
/// `#[serde(deserialize_with = "…")]` on plain string fields that may look numeric.
pub fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// [`lenient_string`] for an `Option<String>` field (with `#[serde(default)]`).
pub fn lenient_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    lenient_string(d).map(Some)
}

/// One thing wrong with the configuration, named by its field (`s3.endpoint`,
/// `watch[1].path`); the field is empty for problems with the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A line and column in a file, both counted from 1 (columns in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where a value was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file; the position of the key (or of its table, for a missing
    /// field) when the file has it.
    File {
        path: PathBuf,
        position: Option<Position>,
    },
    /// This environment variable.
    Env(String),
    /// Neither (a default, with no file given).
    Unknown,
}

/// A [`Problem`] and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub origin: Origin,
    pub problem: Problem,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File {
                path,
                position: Some(p),
            } => write!(f, "{}:{}:{}: ", path.display(), p.line, p.column)?,
            Origin::File {
                path,
                position: None,
            } => write!(f, "{}: ", path.display())?,
            Origin::Env(var) => write!(f, "{var} (environment): ")?,
            Origin::Unknown => {}
        }
        self.problem.fmt(f)
    }
}

/// Everything wrong with a configuration: `invalid configuration:` and then one
/// [`Located`] problem per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report(pub Vec<Located>);

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration:")?;
        for problem in &self.0 {
            write!(f, "\n{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// The configuration sources of one service: the file (when given), then the environment.
pub struct Layers {
    figment: Figment,
    file: Option<FileText>,
    env: Option<EnvLayer>,
}

struct FileText {
    path: PathBuf,
    document: ImDocument<String>,
}

struct EnvLayer {
    prefix: String,
    metadata: Metadata,
}

/// The file as a figment provider, named after its path so errors can say it came from
/// the file.
struct TomlText<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Provider for TomlText<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", Source::File(self.path.to_path_buf()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(self.text).data()
    }
}

impl Layers {
    /// Reads `file` (when given; it must exist) and the environment variables starting with
    /// `env_prefix` (`UPLINK_AGENT_`; `__` nests). `<prefix>CONFIG`, which names the file,
    /// is not a field. A file that cannot be read or is not TOML is the one problem reported.
    pub fn load(file: Option<&Path>, env_prefix: &str) -> Result<Self, Report> {
        let text = match file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some((path, text)),
                Err(e) => {
                    return Err(Report(vec![Located {
                        origin: Origin::File {
                            path: path.to_path_buf(),
                            position: None,
                        },
                        problem: Problem::new("", format!("cannot read the file: {e}")),
                    }]))
                }
            },
            None => None,
        };
        Self::new(
            text.as_ref().map(|(p, t)| (*p, t.as_str())),
            Some(env_prefix),
        )
    }

    /// Only TOML `text`, as if read from `path` (tests, embedded defaults).
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, Report> {
        Self::new(Some((path, text)), None)
    }

    fn new(file: Option<(&Path, &str)>, env_prefix: Option<&str>) -> Result<Self, Report> {
        let mut figment = Figment::new();
        let mut parsed = None;
        if let Some((path, text)) = file {
            let document = ImDocument::parse(text.to_string()).map_err(|e| {
                let position = e.span().map(|s| position_at(text, s.start));
                let message = e.message().trim().replace('\n', "; ");
                Report(vec![Located {
                    origin: Origin::File {
                        path: path.to_path_buf(),
                        position,
                    },
                    problem: Problem::new("", format!("not valid TOML: {message}")),
                }])
            })?;
            figment = figment.merge(TomlText { path, text });
            parsed = Some(FileText {
                path: path.to_path_buf(),
                document,
            });
        }
        let env = env_prefix.map(|prefix| {
            let env = Env::prefixed(prefix).split("__").ignore(&["config"]);
            let layer = EnvLayer {
                prefix: prefix.to_string(),
                metadata: env.metadata(),
            };
            figment = std::mem::take(&mut figment).merge(env);
            layer
        });
        Ok(Layers {
            figment,
            file: parsed,
            env,
        })
    }

    /// The merged sources.
    pub fn figment(&self) -> &Figment {
        &self.figment
    }

    /// Deserializes the merged sources; each error names where and which field.
    pub fn extract<T: DeserializeOwned>(&self) -> Result<T, Report> {
        self.figment
            .extract()
            .map_err(|e| Report(e.into_iter().map(|e| self.locate_error(e)).collect()))
    }

    /// Says where each of `problems` (a service's own validation, fields as dotted paths
    /// like `s3.endpoint`) was set: the environment variable that set it, else its line in
    /// the file, else the line of its nearest table in the file.
    pub fn locate(&self, problems: impl IntoIterator<Item = Problem>) -> Report {
        Report(
            problems
                .into_iter()
                .map(|problem| {
                    let path: Vec<String> = problem.field.split('.').map(str::to_string).collect();
                    let source = self.figment.find_metadata(&problem.field);
                    Located {
                        origin: self.origin(source, &path),
                        problem,
                    }
                })
                .collect(),
        )
    }

    fn locate_error(&self, e: figment::Error) -> Located {
        let mut path = e.path.clone();
        let message = match &e.kind {
            Kind::MissingField(name) => {
                // The error's metadata is that of the enclosing table.
                path.push(name.to_string());
                let origin = self.origin(None, &path);
                return Located {
                    origin,
                    problem: Problem::new(field_name(&path), "missing (it has no default)"),
                };
            }
            Kind::UnknownField(_, []) => "unknown field (this table takes none)".to_string(),
            Kind::UnknownField(_, expected) => {
                format!("unknown field (expected one of: {})", expected.join(", "))
            }
            Kind::UnknownVariant(found, expected) => {
                format!(
                    "unknown variant `{found}` (expected one of: {})",
                    expected.join(", ")
                )
            }
            Kind::InvalidValue(actual, expected) => {
                format!("invalid value: found {actual}, expected {expected}")
            }
            kind => kind.to_string(),
        };
        Located {
            origin: self.origin(e.metadata.as_ref(), &path),
            problem: Problem::new(field_name(&path), message),
        }
    }

    /// Where the value at `path` came from, given the metadata of its source if known.
    fn origin(&self, source: Option<&Metadata>, path: &[String]) -> Origin {
        if let (Some(source), Some(env)) = (source, &self.env) {
            if *source == env.metadata {
                let keys: Vec<String> = path.iter().map(|k| k.to_ascii_uppercase()).collect();
                return Origin::Env(format!("{}{}", env.prefix, keys.join("__")));
            }
        }
        match &self.file {
            Some(file) => {
                let keys: Vec<&str> = path.iter().map(String::as_str).collect();
                let spans = spans(file.document.as_item(), &keys);
                Origin::File {
                    path: file.path.clone(),
                    position: spans
                        .last()
                        .map(|s| position_at(file.document.raw(), s.start)),
                }
            }
            None => Origin::Unknown,
        }
    }
}

/// `watch[1].path` for the path `["watch", "1", "path"]`.
fn field_name(path: &[String]) -> String {
    let mut name = String::new();
    for key in path {
        if key.parse::<usize>().is_ok() && !name.is_empty() {
            name.push_str(&format!("[{key}]"));
        } else {
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(key);
        }
    }
    name
}

/// The line and column of the key at `path` in TOML `text` (array elements by index:
/// `["watch", "1", "path"]`), or `None` when the text does not set it (or is not TOML).
pub fn position(text: &str, path: &[&str]) -> Option<Position> {
    let document = ImDocument::parse(text).ok()?;
    let spans = spans(document.as_item(), path);
    if spans.len() == path.len() {
        spans.last().map(|s| position_at(text, s.start))
    } else {
        None
    }
}

/// One step of a walk down a document.
enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    Table(&'a dyn TableLike),
}

/// The spans of the keys along `path`, as far as the document has them: each key's span,
/// an array element's span, or an array-of-tables entry's header span.
fn spans(root: &Item, path: &[&str]) -> Vec<Range<usize>> {
    let mut found = Vec::new();
    let mut node = Node::Item(root);
    for key in path {
        let table = match node {
            Node::Table(t) => Some(t),
            Node::Item(i) => i.as_table_like(),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        };
        let step = if let Some(table) = table {
            table.get_key_value(key).map(|(k, item)| {
                // A `[table]` header spans the brackets (and `[[table]]`: its first
                // header); a key spans its name.
                let header = match item {
                    Item::Table(t) if !t.is_implicit() && !t.is_dotted() => t.span(),
                    Item::ArrayOfTables(a) => a.get(0).and_then(|t| t.span()),
                    _ => None,
                };
                let span = header.or_else(|| k.span());
                (span, Node::Item(item))
            })
        } else {
            let index = key.parse::<usize>().ok();
            match (node, index) {
                (Node::Item(Item::ArrayOfTables(a)), Some(i)) => a
                    .get(i)
                    .map(|t| (t.span(), Node::Table(t as &dyn TableLike))),
                (
                    Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)),
                    Some(i),
                ) => a.get(i).map(|v| (v.span(), Node::Value(v))),
                _ => None,
            }
        };
        match step {
            Some((Some(span), next)) => {
                found.push(span);
                node = next;
            }
            _ => break,
        }
    }
    found
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn position_at(text: &str, offset: usize) -> Position {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Position {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn at(line: usize, column: usize) -> Option<Position> {
        Some(Position { line, column })
    }

    const DOC: &str = r#"# comment
top = 1
dotted.inner = "x"
inline = { a = 1, b = { c = 2 } }
list = ["a", "bé", "c"]

[table]
key = "v"
  indented = 2

[table.sub]
deep = true

[[watch]]
path = "/a"

[[watch]]
path = "/b"
ignore = ["*.tmp"]
"#;

    #[test]
    fn top_level_and_nested_tables() {
        assert_eq!(position(DOC, &["top"]), at(2, 1));
        assert_eq!(position(DOC, &["table"]), at(7, 1));
        assert_eq!(position(DOC, &["table", "key"]), at(8, 1));
        assert_eq!(position(DOC, &["table", "indented"]), at(9, 3));
        assert_eq!(position(DOC, &["table", "sub"]), at(11, 1));
        assert_eq!(position(DOC, &["table", "sub", "deep"]), at(12, 1));
    }

    #[test]
    fn dotted_keys() {
        assert_eq!(position(DOC, &["dotted"]), at(3, 1));
        assert_eq!(position(DOC, &["dotted", "inner"]), at(3, 8));
    }

    #[test]
    fn inline_tables() {
        assert_eq!(position(DOC, &["inline"]), at(4, 1));
        assert_eq!(position(DOC, &["inline", "a"]), at(4, 12));
        assert_eq!(position(DOC, &["inline", "b", "c"]), at(4, 25));
    }

    #[test]
    fn arrays_and_arrays_of_tables() {
        assert_eq!(position(DOC, &["list", "2"]), at(5, 20));
        assert_eq!(position(DOC, &["watch", "0"]), at(14, 1));
        assert_eq!(position(DOC, &["watch", "1"]), at(17, 1));
        assert_eq!(position(DOC, &["watch", "1", "path"]), at(18, 1));
        assert_eq!(position(DOC, &["watch", "1", "ignore", "0"]), at(19, 11));
    }

    #[test]
    fn keys_absent_from_the_text_have_no_position() {
        assert_eq!(position(DOC, &["nope"]), None);
        assert_eq!(position(DOC, &["table", "nope"]), None);
        assert_eq!(position(DOC, &["watch", "2"]), None);
        assert_eq!(position(DOC, &["watch", "x"]), None);
        assert_eq!(position(DOC, &["top", "below"]), None);
        assert_eq!(position(DOC, &["list", "9"]), None);
        assert_eq!(position("not = [toml", &["not"]), None);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        name: String,
        #[serde(default)]
        net: Net,
        #[serde(default)]
        watch: Vec<Watch>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Net {
        #[serde(default)]
        port: u16,
        #[serde(default)]
        password: Option<Secret>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Watch {
        path: String,
    }

    fn report(text: &str) -> String {
        Layers::from_toml(Path::new("svc.toml"), text)
            .and_then(|l| l.extract::<Cfg>())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn extract_errors_name_file_line_and_field() {
        assert_eq!(
            report("name = \"n\"\n\n[net]\nport = \"x\"\n"),
            "invalid configuration:\n\
             svc.toml:4:1: net.port: invalid type: found string \"x\", expected u16"
        );
        assert_eq!(
            report("name = \"n\"\nnmae = 1\n"),
            "invalid configuration:\n\
             svc.toml:2:1: nmae: unknown field (expected one of: name, net, watch)"
        );
        assert_eq!(
            report("[net]\nport = 1\n"),
            "invalid configuration:\nsvc.toml: name: missing (it has no default)"
        );
        assert_eq!(
            report("name = \"n\"\n[[watch]]\npath = \"/a\"\n[[watch]]\n"),
            "invalid configuration:\nsvc.toml:4:1: watch[1].path: missing (it has no default)"
        );
        assert_eq!(
            report("name = \"n\"\nnet = { port = -1 }\n"),
            "invalid configuration:\nsvc.toml:2:9: net.port: invalid value: \
             found signed int `-1`, expected u16"
        );
        assert_eq!(
            report("name = \"n\"\n[net\n"),
            "invalid configuration:\nsvc.toml:2:5: not valid TOML: invalid table header; \
             expected `.`, `]`"
        );
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        for text in [
            "name = \"n\"\n[net]\npassword = \"hunter2\"\nport = \"x\"\n",
            "name = \"n\"\n[net]\npassword = \"hunter2\n",
            "name = \"n\"\n[net]\npassword = { hunter2 = 1 }\n",
            "name = \"n\"\n[net]\npassword = [\"hunter2\"]\n",
            "name = \"n\"\n[net]\npassword = \"hunter2\"\npassword = \"hunter2\"\n",
        ] {
            let report = report(text);
            assert!(report.contains("svc.toml:"), "{report}");
            assert!(!report.contains("hunter2"), "{report}");
        }
        let cfg: Cfg = Layers::from_toml(Path::new("s"), "name = \"n\"\nnet.password = 1234\n")
            .unwrap()
            .extract()
            .unwrap();
        assert_eq!(cfg.net.password.as_ref().map(Secret::expose), Some("1234"));
        assert_eq!(format!("{:?}", cfg.net.password), "Some([redacted])");
        assert_eq!(Secret::new("x").to_string(), "[redacted]");
    }

    #[test]
    fn validation_problems_are_located() {
        let layers = Layers::from_toml(
            Path::new("svc.toml"),
            "name = \"n\"\n[net]\nport = 0\n[[watch]]\npath = \"\"\n",
        )
        .unwrap();
        let report = layers.locate([
            Problem::new("net.port", "must not be 0"),
            Problem::new("net.password", "required"),
            Problem::new("watch", "bad"),
            Problem::new("name", "bad"),
            Problem::new("other", "bad"),
        ]);
        assert_eq!(
            report.to_string(),
            "invalid configuration:\n\
             svc.toml:3:1: net.port: must not be 0\n\
             svc.toml:2:1: net.password: required\n\
             svc.toml:4:1: watch: bad\n\
             svc.toml:1:1: name: bad\n\
             svc.toml: other: bad"
        );
    }

    #[test]
    fn environment_values_name_their_variable() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("svc.toml", "name = \"n\"\n[net]\n")?;
            jail.set_env("UPLINK_SVCTEST_NET__PORT", "x");
            jail.set_env("UPLINK_SVCTEST_CONFIG", "svc.toml");
            let layers = Layers::load(Some(Path::new("svc.toml")), "UPLINK_SVCTEST_").unwrap();
            assert_eq!(
                layers.extract::<Cfg>().unwrap_err().to_string(),
                "invalid configuration:\nUPLINK_SVCTEST_NET__PORT (environment): net.port: \
                 invalid type: found string \"x\", expected u16"
            );
            jail.set_env("UPLINK_SVCTEST_NET__PORT", "0");
            let layers = Layers::load(Some(Path::new("svc.toml")), "UPLINK_SVCTEST_").unwrap();
            layers.extract::<Cfg>().unwrap();
            assert_eq!(
                layers
                    .locate([Problem::new("net.port", "must not be 0")])
                    .to_string(),
                "invalid configuration:\n\
                 UPLINK_SVCTEST_NET__PORT (environment): net.port: must not be 0"
            );
            let missing = Layers::load(Some(Path::new("nope.toml")), "UPLINK_SVCTEST_")
                .err()
                .unwrap()
                .to_string();
            assert!(
                missing.starts_with("invalid configuration:\nnope.toml: cannot read the file:"),
                "{missing}"
            );
            Ok(())
        });
    }
}
