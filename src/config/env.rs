//! `${env:NAME}` interpolation over every string value of the YAML tree.
//!
//! It runs on the parsed tree, not on the text, so a variable's value can never
//! change the YAML structure (a value holding `\n` or `: ` stays one string),
//! and mapping keys are left alone.

use serde_norway::Value;

use super::position::{join_index, join_key};

const OPEN: &str = "${env:";

/// Looks a variable up; `None` means it is not set.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Replaces every `${env:NAME}` in the string values under `value`. Returns
/// (path, message) for each variable that could not be resolved; such a string
/// is left as written.
pub(crate) fn interpolate_tree(value: &mut Value, path: &str, lookup: EnvLookup<'_>) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    walk(value, path, lookup, &mut errors);
    errors
}

fn walk(value: &mut Value, path: &str, lookup: EnvLookup<'_>, errors: &mut Vec<(String, String)>) {
    match value {
        Value::String(s) => match interpolate(s, lookup) {
            Ok(Some(replaced)) => *s = replaced,
            Ok(None) => {}
            Err(messages) => errors.extend(messages.into_iter().map(|m| (path.to_owned(), m))),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, &join_index(path, i), lookup, errors);
            }
        }
        Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                walk(item, &join_key(path, &key_text(key)), lookup, errors);
            }
        }
        Value::Tagged(tagged) => walk(&mut tagged.value, path, lookup, errors),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// How a mapping key appears in a field path.
pub(crate) fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => "?".to_owned(),
    }
}

/// `Ok(None)` when `s` holds no reference. Every `$` that does not start
/// `${env:` is kept as written (so `$$` and `$HOME` pass through).
pub(crate) fn interpolate(s: &str, lookup: EnvLookup<'_>) -> Result<Option<String>, Vec<String>> {
    if !s.contains(OPEN) {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut errors = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find('}') else {
            errors.push(format!("unterminated {OPEN}...}} reference (write {OPEN}NAME}})"));
            rest = "";
            break;
        };
        let name = &after[..end];
        if !valid_name(name) {
            errors.push(format!(
                "invalid environment variable name {name:?} in {OPEN}{name}}} (letters, digits and _, not starting with a digit)"
            ));
        } else {
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => errors.push(format!("environment variable {name} is not set")),
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(Some(out))
    } else {
        Err(errors)
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".to_owned()),
            "HOST" => Some("cp.internal".to_owned()),
            "EMPTY" => Some(String::new()),
            "TRICKY" => Some("a: b\n- c ${env:TOKEN}".to_owned()),
            _ => None,
        }
    }

    fn run(s: &str) -> Result<Option<String>, Vec<String>> {
        interpolate(s, &env)
    }

    #[test]
    fn env_reference_is_replaced() {
        assert_eq!(run("${env:TOKEN}"), Ok(Some("s3cret".to_owned())));
        assert_eq!(run("${env:EMPTY}"), Ok(Some(String::new())));
    }

    #[test]
    fn env_several_references_in_one_string() {
        assert_eq!(
            run("Bearer ${env:TOKEN} @ http://${env:HOST}:9090/"),
            Ok(Some("Bearer s3cret @ http://cp.internal:9090/".to_owned()))
        );
    }

    #[test]
    fn env_values_are_not_reinterpreted() {
        assert_eq!(run("${env:TRICKY}"), Ok(Some("a: b\n- c ${env:TOKEN}".to_owned())));
    }

    #[test]
    fn env_other_dollar_uses_pass_through() {
        assert_eq!(run("price $$5 and $HOME and ${HOME} and $"), Ok(None));
        assert_eq!(run("$$${env:TOKEN}$"), Ok(Some("$$s3cret$".to_owned())));
    }

    #[test]
    fn env_missing_variable_is_named() {
        let errors = run("a ${env:NOPE} b ${env:TOKEN} ${env:ALSO_NOPE}").unwrap_err();
        assert_eq!(
            errors,
            vec![
                "environment variable NOPE is not set".to_owned(),
                "environment variable ALSO_NOPE is not set".to_owned()
            ]
        );
    }

    #[test]
    fn env_malformed_references_are_errors() {
        assert!(run("${env:TOKEN").unwrap_err().iter().any(|e| e.contains("unterminated")));
        assert!(run("${env:}").unwrap_err().iter().any(|e| e.contains("invalid environment variable name")));
        assert!(run("${env:A-B}").unwrap_err().iter().any(|e| e.contains("invalid environment variable name")));
    }

    #[test]
    fn env_tree_walk_reports_paths_and_skips_keys() {
        let mut value: Value = serde_norway::from_str(
            "a: ${env:TOKEN}\nlist: [x, '${env:NOPE}']\n'${env:TOKEN}': {n: 5, s: '${env:HOST}'}\n",
        )
        .unwrap();
        let errors = interpolate_tree(&mut value, "", &env);
        assert_eq!(errors, vec![("list[1]".to_owned(), "environment variable NOPE is not set".to_owned())]);
        assert_eq!(value["a"], Value::String("s3cret".to_owned()));
        assert_eq!(value["${env:TOKEN}"]["s"], Value::String("cp.internal".to_owned()));
    }
}
