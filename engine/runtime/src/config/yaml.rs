//! Reading YAML with positions: parsing, `${NAME}` interpolation, and small schema helpers that
//! report every problem (unknown keys with "did you mean", wrong types) instead of the first.
//!
//! Typed sub-trees (a stage's `config:`) are deserialized with serde straight from the marked
//! nodes by [`deserialize_at`], which maps serde's error back to a position.

use std::path::Path;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode};
use marked_yaml::{LoadError, LoaderOptions, Node};
use prompter_core::diagnostic::{Position, did_you_mean};
use prompter_core::plugin::BuildError;

use super::diagnostics::{Diagnostics, WithHelp};

/// Where to read environment variables from (the process environment, or a map in tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The deepest column a block-style line may start at. Each level of block nesting takes at
/// least one column, so this bounds the nesting (the parser bounds flow-style `[[[...]]]`
/// itself); without it, a few thousand levels overflow the stack while the tree is built or
/// dropped. Real configs stay under 30.
pub const MAX_COLUMN: usize = 256;

/// The line and column of the first line whose content starts past [`MAX_COLUMN`] (counting
/// indentation and block indicators: `- `, `? `).
fn too_deep(text: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().find_map(|(i, line)| {
        let col = line
            .char_indices()
            .find(|&(at, c)| {
                !(c == ' ' || ((c == '-' || c == '?') && line[at + 1..].starts_with([' ', '\t'])))
            })
            .map_or(0, |(at, _)| line[..at].chars().count());
        (col > MAX_COLUMN).then_some((i + 1, col + 1))
    })
}

/// Parses `text` into a node tree; reports a syntax error with its position.
pub fn parse(file: &Path, text: &str, diags: &mut Diagnostics) -> Option<Node> {
    diags.add_source(file, text);
    if let Some((line, col)) = too_deep(text) {
        diags.error_at(
            file,
            Some(Position { line, col }),
            format!(
                "nested too deeply: this line starts at column {col}, past the {MAX_COLUMN} a \
                 Prompter config may use"
            ),
        );
        return None;
    }
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(node) => Some(node),
        Err(e) => {
            let (marker, message) = match &e {
                LoadError::TopLevelMustBeMapping(m) => (
                    Some(*m),
                    "the top level must be a mapping of keys".to_owned(),
                ),
                LoadError::TopLevelMustBeSequence(m) => {
                    (Some(*m), "the top level must be a list".to_owned())
                }
                LoadError::UnexpectedAnchor(m) => (
                    Some(*m),
                    "YAML anchors and aliases are not supported".to_owned(),
                ),
                LoadError::MappingKeyMustBeScalar(m) => {
                    (Some(*m), "mapping keys must be plain strings".to_owned())
                }
                LoadError::UnexpectedTag(m) => (Some(*m), "YAML tags are not supported".to_owned()),
                LoadError::ScanError(m, se) => (Some(*m), format!("invalid YAML: {}", se.info())),
                LoadError::DuplicateKey(inner) => (
                    inner.key.span().start().copied(),
                    format!(
                        "duplicate key `{}` (first at line {})",
                        inner.key.as_str(),
                        inner.prev_key.span().start().map(|m| m.line()).unwrap_or(0)
                    ),
                ),
            };
            diags.error(file, marker.as_ref(), message);
            None
        }
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` in every scalar; `$${` is a literal `${`.
/// A variable that is unset and has no default is reported at its scalar.
pub fn interpolate(file: &Path, node: &mut Node, env: EnvLookup<'_>, diags: &mut Diagnostics) {
    match node {
        Node::Scalar(s) => {
            if s.as_str().contains('$') {
                match substitute(s.as_str(), env) {
                    Ok(Some(new)) => {
                        let span = *s.span();
                        *s = MarkedScalarNode::new(span, new);
                    }
                    Ok(None) => {}
                    Err(msg) => {
                        diags.error(file, s.span().start(), msg);
                    }
                }
            }
        }
        Node::Sequence(seq) => {
            for n in seq.iter_mut() {
                interpolate(file, n, env, diags);
            }
        }
        Node::Mapping(map) => {
            for (_, n) in map.iter_mut() {
                interpolate(file, n, env, diags);
            }
        }
    }
}

/// `Ok(None)` when nothing changed.
fn substitute(input: &str, env: EnvLookup<'_>) -> Result<Option<String>, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    let mut changed = false;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(stripped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = stripped;
            changed = true;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated `${` (use `$${` for a literal)".to_owned())?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name `{name}`"));
            }
            match (env(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set (give a default with `${{{name}:-value}}`)"
                    ));
                }
            }
            rest = &body[end + 1..];
            changed = true;
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(changed.then_some(out))
}

/// A YAML type name for messages.
pub fn type_name(node: &Node) -> &'static str {
    match node {
        Node::Scalar(_) => "a scalar",
        Node::Sequence(_) => "a list",
        Node::Mapping(_) => "a mapping",
    }
}

/// `node` as a mapping, or a reported problem.
pub fn expect_map<'n>(
    file: &Path,
    node: &'n Node,
    what: &str,
    diags: &mut Diagnostics,
) -> Option<&'n MarkedMappingNode> {
    let m = node.as_mapping();
    if m.is_none() {
        diags.error_node(
            file,
            node,
            format!("{what} must be a mapping, found {}", type_name(node)),
        );
    }
    m
}

/// `node` as a list, or a reported problem.
pub fn expect_seq<'n>(
    file: &Path,
    node: &'n Node,
    what: &str,
    diags: &mut Diagnostics,
) -> Option<&'n MarkedSequenceNode> {
    let s = node.as_sequence();
    if s.is_none() {
        diags.error_node(
            file,
            node,
            format!("{what} must be a list, found {}", type_name(node)),
        );
    }
    s
}

/// `node` as a scalar, or a reported problem.
pub fn expect_scalar<'n>(
    file: &Path,
    node: &'n Node,
    what: &str,
    diags: &mut Diagnostics,
) -> Option<&'n MarkedScalarNode> {
    let s = node.as_scalar();
    if s.is_none() {
        diags.error_node(
            file,
            node,
            format!("{what} must be a single value, found {}", type_name(node)),
        );
    }
    s
}

/// Reports every key of `map` that is not in `allowed`, with a "did you mean" hint.
pub fn check_keys(
    file: &Path,
    map: &MarkedMappingNode,
    allowed: &[&str],
    what: &str,
    diags: &mut Diagnostics,
) {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            let help = match did_you_mean(key.as_str(), allowed.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!(
                    "{what} accepts: {}",
                    allowed
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            diags
                .error(
                    file,
                    key.span().start(),
                    format!("unknown key `{}` in {what}", key.as_str()),
                )
                .help(Some(help));
        }
    }
}

/// A required key, or a reported problem at the mapping.
pub fn required<'n>(
    file: &Path,
    map: &'n MarkedMappingNode,
    key: &str,
    what: &str,
    diags: &mut Diagnostics,
) -> Option<&'n Node> {
    let n = map.get_node(key);
    if n.is_none() {
        diags.error(
            file,
            map.span().start(),
            format!("{what} is missing the required key `{key}`"),
        );
    }
    n
}

/// An optional unsigned integer.
pub fn opt_u64(
    file: &Path,
    map: &MarkedMappingNode,
    key: &str,
    diags: &mut Diagnostics,
) -> Option<u64> {
    let node = map.get_node(key)?;
    let s = expect_scalar(file, node, &format!("`{key}`"), diags)?;
    match s.as_str().trim().parse::<u64>() {
        Ok(v) => Some(v),
        Err(_) => {
            diags.error_node(
                file,
                node,
                format!("`{key}` must be a whole number, found `{}`", s.as_str()),
            );
            None
        }
    }
}

/// Deserializes a typed sub-tree, mapping serde's error to a position.
pub fn deserialize_at<T: serde::de::DeserializeOwned>(
    file: &Path,
    node: &Node,
    diags: &mut Diagnostics,
) -> Option<T> {
    match marked_yaml::from_node::<T>(node) {
        Ok(v) => Some(v),
        Err(e) => {
            let problem = prompter_core::plugin::config_problem(e);
            report_build_error(file, node, &problem, diags);
            None
        }
    }
}

/// Reports a stage build problem at its position: the exact one when known, else the node at
/// its path inside `config` (for an unknown key, the key itself).
pub fn report_build_error(
    file: &Path,
    config: &Node,
    problem: &BuildError,
    diags: &mut Diagnostics,
) {
    let pos = problem
        .pos
        .or_else(|| locate(config, &problem.path, &problem.message));
    let mut message = friendly(&problem.message);
    // Scalar parse errors come with a position but no field name: name the key at that spot.
    if problem.path.is_empty()
        && problem.pos.is_some()
        && !message.starts_with("unknown")
        && let Some(key) = pos.and_then(|p| key_at(config, p))
    {
        message = format!("invalid `{key}`: {message}");
    }
    diags
        .error_at(file, pos, message)
        .help(problem.help.clone());
}

/// Plainer words for the standard library's parse errors.
fn friendly(message: &str) -> String {
    message
        .replace(
            "invalid digit found in string",
            "expected a whole number (no sign, no decimals)",
        )
        .replace("invalid float literal", "expected a number")
}

/// The mapping key whose value starts at `pos`.
fn key_at(node: &Node, pos: Position) -> Option<String> {
    match node {
        Node::Mapping(m) => m.iter().find_map(|(k, v)| {
            let at = v.span().start().map(|mk| Position {
                line: mk.line(),
                col: mk.column(),
            });
            if at == Some(pos) {
                Some(k.as_str().to_owned())
            } else {
                key_at(v, pos)
            }
        }),
        Node::Sequence(s) => s.iter().find_map(|v| key_at(v, pos)),
        Node::Scalar(_) => None,
    }
}

/// Finds the position of `path` (dotted; numbers index lists) inside `root`. For "unknown
/// key/field `x`" messages it points at the key `x` in the mapping at `path`.
pub fn locate(root: &Node, path: &str, message: &str) -> Option<Position> {
    let mut node = root;
    let mut key_marker = None;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let next = match node {
            Node::Mapping(m) => {
                key_marker = m
                    .keys()
                    .find(|k| k.as_str() == seg)
                    .and_then(|k| k.span().start().copied());
                m.get_node(seg)
            }
            Node::Sequence(s) => seg.parse::<usize>().ok().and_then(|i| s.get_node(i)),
            Node::Scalar(_) => None,
        };
        match next {
            Some(n) => node = n,
            None => break,
        }
    }
    let unknown = message
        .strip_prefix("unknown key `")
        .or_else(|| message.strip_prefix("unknown field `"))
        .and_then(|r| r.split('`').next());
    if let (Some(field), Node::Mapping(m)) = (unknown, node)
        && let Some(k) = m.keys().find(|k| k.as_str() == field)
    {
        return k.span().start().map(|mk| Position {
            line: mk.line(),
            col: mk.column(),
        });
    }
    let marker = if matches!(node, Node::Scalar(_)) {
        node.span().start().copied()
    } else {
        key_marker.or(node.span().start().copied())
    };
    marker.map(|m| Position {
        line: m.line(),
        col: m.column(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn interpolation_forms() {
        let e = env(&[("HOST", "example.org"), ("EMPTY", "")]);
        assert_eq!(
            substitute("https://${HOST}/x", &e).unwrap().unwrap(),
            "https://example.org/x"
        );
        assert_eq!(substitute("${PORT:-8080}", &e).unwrap().unwrap(), "8080");
        assert_eq!(substitute("${EMPTY:-d}", &e).unwrap().unwrap(), "d");
        assert_eq!(
            substitute("cost $5 and $${NOT}", &e).unwrap().unwrap(),
            "cost $5 and ${NOT}"
        );
        assert_eq!(substitute("plain", &e).unwrap(), None);
        assert!(
            substitute("${MISSING}", &e)
                .unwrap_err()
                .contains("`MISSING` is not set")
        );
        assert!(
            substitute("${OPEN", &e)
                .unwrap_err()
                .contains("unterminated")
        );
    }

    #[test]
    fn interpolation_errors_are_positioned() {
        let mut d = Diagnostics::default();
        let file = Path::new("f.yaml");
        let mut node = parse(file, "a:\n  b: \"${NOPE}\"\n", &mut d).unwrap();
        interpolate(file, &mut node, &env(&[]), &mut d);
        let rendered = d.render();
        assert!(
            rendered.starts_with("f.yaml:2:6: error: environment variable `NOPE` is not set"),
            "{rendered}"
        );
    }

    #[test]
    fn locate_points_at_unknown_keys_and_list_items() {
        let mut d = Diagnostics::default();
        let root = parse(
            Path::new("f"),
            "messages:\n  - role: human\n    txt: hi\n",
            &mut d,
        )
        .unwrap();
        assert_eq!(
            locate(&root, "messages.0", "unknown key `txt`"),
            Some(Position { line: 3, col: 5 })
        );
        assert_eq!(
            locate(&root, "messages.0.role", "bad"),
            Some(Position { line: 2, col: 11 })
        );
    }
}
