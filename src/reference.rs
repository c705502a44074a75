//! The CRD field reference (`docs/reference.md`): Markdown built from the CRD the code generates,
//! one row per field with its type, whether it is required or its default, its bounds and the
//! description `kubectl explain` shows.
//!
//! A field's path is dotted from `spec` or `status`; the items of an array of objects are `path[]`
//! and the values of a map of objects `path.*`. Scalar items and values get no row of their own:
//! their type and bounds are given on the array's or map's row. The output depends only on the
//! CRD (properties are walked in name order), so `tests/docs.rs` can compare the committed file
//! with it.

use std::fmt::Write as _;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion, JSONSchemaProps, JSONSchemaPropsOrArray,
    JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::api::RegistryAccess;

/// The field reference of the `RegistryAccess` CRD, as committed in `docs/reference.md`.
pub fn markdown() -> String {
    render(&RegistryAccess::crd())
}

/// The field reference of any CRD.
pub fn render(crd: &CustomResourceDefinition) -> String {
    let names = &crd.spec.names;
    let mut out = String::new();
    let _ = writeln!(out, "# {} field reference\n", names.kind);
    out.push_str(
        "<!-- Generated from the CRD in src/api.rs by `registry-access-operator crd-reference`: do not edit;\n     \
         run `make docs` after changing the CRD (tests/docs.rs fails while this file differs). -->\n\n",
    );
    out.push_str(
        "Every field of the resource as the API server checks it at `kubectl apply`. The descriptions\n\
         are the ones `kubectl explain` shows. A path ending in `[]` is an item of a list, in `.*` a\n\
         value of a map.\n\n",
    );
    let _ = writeln!(out, "- name: `{}`", crd.metadata.name.as_deref().unwrap_or_default());
    let _ = writeln!(out, "- group: `{}`", crd.spec.group);
    let _ = writeln!(out, "- kind: `{}`", names.kind);
    let _ = writeln!(out, "- plural: `{}`", names.plural);
    if let Some(singular) = &names.singular {
        let _ = writeln!(out, "- singular: `{singular}`");
    }
    if let Some(short) = names.short_names.as_ref().filter(|s| !s.is_empty()) {
        let _ = writeln!(out, "- short names: {}", short.iter().map(|s| code(s)).collect::<Vec<_>>().join(", "));
    }
    let _ = writeln!(out, "- scope: {}", crd.spec.scope);
    let versions = crd.spec.versions.iter().map(|v| code(&v.name)).collect::<Vec<_>>().join(", ");
    let _ = writeln!(out, "- versions: {versions}");
    for version in &crd.spec.versions {
        out.push('\n');
        render_version(&mut out, &crd.spec.group, version);
    }
    out
}

fn render_version(out: &mut String, group: &str, version: &CustomResourceDefinitionVersion) {
    let _ = writeln!(out, "## {}\n", version.name);
    let mut facts = vec![format!("`apiVersion: {group}/{}`", version.name)];
    facts.push(if version.served { "served".to_owned() } else { "not served".to_owned() });
    if version.storage {
        facts.push("the storage version".to_owned());
    }
    if version.deprecated == Some(true) {
        facts.push("deprecated".to_owned());
    }
    if let Some(sub) = &version.subresources {
        let mut names = Vec::new();
        if sub.status.is_some() {
            names.push("`status`");
        }
        if sub.scale.is_some() {
            names.push("`scale`");
        }
        if !names.is_empty() {
            facts.push(format!("subresources {}", names.join(", ")));
        }
    }
    let _ = writeln!(out, "{}.\n", capitalise(&facts.join(", ")));
    let Some(root) = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()) else {
        out.push_str("No schema.\n");
        return;
    };
    if let Some(description) = &root.description {
        let _ = writeln!(out, "{}\n", escape(description, false));
    }
    let rules = rules(root);
    if !rules.is_empty() {
        out.push_str("Rules on the whole object:\n\n");
        for rule in rules {
            let _ = writeln!(out, "- {}", escape(rule.strip_prefix("rule: ").unwrap_or(&rule), false));
        }
        out.push('\n');
    }
    if let Some(columns) = version.additional_printer_columns.as_ref().filter(|c| !c.is_empty()) {
        out.push_str("Columns of `kubectl get`:\n\n| column | JSON path | type | shown |\n|---|---|---|---|\n");
        for c in columns {
            let shown = if c.priority.unwrap_or(0) > 0 { "with `-o wide`" } else { "always" };
            let _ =
                writeln!(out, "| {} | {} | {} | {shown} |", escape(&c.name, true), cell_code(&c.json_path), c.type_);
        }
        out.push('\n');
    }
    let required = root.required.as_deref().unwrap_or_default();
    for (name, schema) in root.properties.iter().flatten() {
        if matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        let _ = writeln!(out, "### {name}\n");
        out.push_str("| field | type | required or default | bounds | description |\n|---|---|---|---|---|\n");
        for row in fields(name, schema, required.contains(name)) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                cell_code(&row.path),
                row.type_name,
                row.presence,
                escape(&row.bounds.join("; "), true),
                escape(&row.description, true)
            );
        }
        out.push('\n');
    }
    // One trailing newline, not two.
    while out.ends_with("\n\n") {
        out.pop();
    }
}

/// One row of a field table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Dotted path, e.g. `spec.clientSecretRef.name`, `status.conditions[].type`, `spec.map.*.x`.
    pub path: String,
    /// `string`, `integer (int64)`, `array of string`, `map of string`, `object`...
    pub type_name: String,
    /// `required`, `optional`, or the default in a code span (and `required` with it, if both).
    pub presence: String,
    /// Each bound in Markdown (`maxLength 253`, ``pattern `...` ``, ...), items' and values' bounds
    /// last.
    pub bounds: Vec<String>,
    /// The schema's description, as written.
    pub description: String,
}

/// The rows of `schema` at `path` and of everything under it, depth first in name order.
pub fn fields(path: &str, schema: &JSONSchemaProps, required: bool) -> Vec<Field> {
    let mut rows = Vec::new();
    walk(path, schema, required, &mut rows);
    rows
}

fn walk(path: &str, schema: &JSONSchemaProps, required: bool, rows: &mut Vec<Field>) {
    let mut presence = Vec::new();
    if required {
        presence.push("required".to_owned());
    }
    if let Some(default) = &schema.default {
        presence.push(format!("default {}", cell_code(&json_text(&default.0))));
    }
    if presence.is_empty() {
        presence.push("optional".to_owned());
    }
    let mut description = schema.description.clone().unwrap_or_default();
    let mut bounds = bounds(schema);
    // Scalar items and values are described on this row.
    for (prefix, inner) in [("each item", items(schema)), ("each value", values(schema))] {
        if let Some(inner) = inner.filter(|s| !is_complex(s)) {
            let inner_bounds = self::bounds(inner);
            if !inner_bounds.is_empty() {
                bounds.push(format!("{prefix}: {}", inner_bounds.join(", ")));
            }
            if let Some(d) = &inner.description {
                description = join_sentences(&description, &format!("{}: {d}", capitalise(prefix)));
            }
        }
    }
    rows.push(Field {
        path: path.to_owned(),
        type_name: type_name(schema),
        presence: presence.join(", "),
        bounds,
        description,
    });
    descend(path, schema, rows);
}

/// Rows for what lies under `schema`: its properties, and items or values that are not scalars.
fn descend(path: &str, schema: &JSONSchemaProps, rows: &mut Vec<Field>) {
    let required = schema.required.as_deref().unwrap_or_default();
    for (name, sub) in schema.properties.iter().flatten() {
        walk(&format!("{path}.{name}"), sub, required.contains(name), rows);
    }
    if let Some(inner) = items(schema).filter(|s| is_complex(s)) {
        walk(&format!("{path}[]"), inner, false, rows);
    }
    if let Some(inner) = values(schema).filter(|s| is_complex(s)) {
        walk(&format!("{path}.*"), inner, false, rows);
    }
}

/// The schema of an array's items (a tuple schema's are not walked: Kubernetes refuses them).
fn items(schema: &JSONSchemaProps) -> Option<&JSONSchemaProps> {
    match &schema.items {
        Some(JSONSchemaPropsOrArray::Schema(s)) => Some(s),
        _ => None,
    }
}

/// The schema of a map's values (`additionalProperties`).
fn values(schema: &JSONSchemaProps) -> Option<&JSONSchemaProps> {
    match &schema.additional_properties {
        Some(JSONSchemaPropsOrBool::Schema(s)) => Some(s),
        _ => None,
    }
}

/// Whether a schema gets rows of its own when it is an item or value: it has fields, items or
/// values, or rules of its own.
fn is_complex(schema: &JSONSchemaProps) -> bool {
    schema.properties.as_ref().is_some_and(|p| !p.is_empty())
        || items(schema).is_some()
        || values(schema).is_some()
        || schema.x_kubernetes_validations.as_ref().is_some_and(|v| !v.is_empty())
}

fn type_name(schema: &JSONSchemaProps) -> String {
    if schema.x_kubernetes_int_or_string == Some(true) {
        return "integer or string".to_owned();
    }
    let base = match schema.type_.as_deref() {
        Some("array") => match items(schema) {
            Some(inner) => format!("array of {}", type_name(inner)),
            None => "array".to_owned(),
        },
        Some("object") => match values(schema) {
            Some(inner) if schema.properties.as_ref().is_none_or(|p| p.is_empty()) => {
                format!("map of {}", type_name(inner))
            }
            _ if schema.x_kubernetes_preserve_unknown_fields == Some(true) => "object (any fields)".to_owned(),
            _ => "object".to_owned(),
        },
        Some(t) => t.to_owned(),
        None => "any".to_owned(),
    };
    match &schema.format {
        Some(format) => format!("{base} ({format})"),
        None => base,
    }
}

fn bounds(schema: &JSONSchemaProps) -> Vec<String> {
    let mut b = Vec::new();
    let mut count = |name: &str, v: Option<i64>| {
        if let Some(v) = v {
            b.push(format!("{name} {v}"));
        }
    };
    count("minLength", schema.min_length);
    count("maxLength", schema.max_length);
    count("minItems", schema.min_items);
    count("maxItems", schema.max_items);
    count("minProperties", schema.min_properties);
    count("maxProperties", schema.max_properties);
    if let Some(min) = schema.minimum {
        let name = if schema.exclusive_minimum == Some(true) { "exclusiveMinimum" } else { "minimum" };
        b.push(format!("{name} {}", number(min)));
    }
    if let Some(max) = schema.maximum {
        let name = if schema.exclusive_maximum == Some(true) { "exclusiveMaximum" } else { "maximum" };
        b.push(format!("{name} {}", number(max)));
    }
    if let Some(m) = schema.multiple_of {
        b.push(format!("multipleOf {}", number(m)));
    }
    if schema.unique_items == Some(true) {
        b.push("unique items".to_owned());
    }
    if let Some(pattern) = &schema.pattern {
        b.push(format!("pattern {}", code(pattern)));
    }
    if let Some(values) = schema.enum_.as_ref().filter(|e| !e.is_empty()) {
        b.push(format!("one of {}", values.iter().map(|v| code(&json_text(&v.0))).collect::<Vec<_>>().join(", ")));
    }
    if let Some(list_type) = &schema.x_kubernetes_list_type {
        match schema.x_kubernetes_list_map_keys.as_ref().filter(|k| !k.is_empty()) {
            Some(keys) => b.push(format!(
                "list type `{list_type}`, keyed by {}",
                keys.iter().map(|k| code(k)).collect::<Vec<_>>().join(", ")
            )),
            None => b.push(format!("list type `{list_type}`")),
        }
    }
    if let Some(map_type) = &schema.x_kubernetes_map_type {
        b.push(format!("map type `{map_type}`"));
    }
    b.extend(rules(schema));
    b
}

/// The CEL rules of a schema, each as its message (or, without one, the rule itself).
fn rules(schema: &JSONSchemaProps) -> Vec<String> {
    schema
        .x_kubernetes_validations
        .iter()
        .flatten()
        .map(|r| match r.message.as_deref().filter(|m| !m.is_empty()) {
            Some(message) => format!("rule: {message}"),
            None => format!("rule: {}", code(&r.rule)),
        })
        .collect()
}

/// A JSON value as text: a string as itself, anything else as compact JSON.
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A bound as written in a schema: `0` rather than `0.0`.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn join_sentences(a: &str, b: &str) -> String {
    match a.trim_end() {
        "" => b.to_owned(),
        a if a.ends_with('.') => format!("{a} {b}"),
        a => format!("{a}. {b}"),
    }
}

/// `s` as a Markdown code span, with a fence longer than any run of backticks inside it.
fn code(s: &str) -> String {
    let longest = s.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest + 1);
    if longest > 0 || s.starts_with(' ') || s.ends_with(' ') {
        format!("{fence} {s} {fence}")
    } else {
        format!("{fence}{s}{fence}")
    }
}

/// A code span for a table cell: `|` escaped (GitHub unescapes it inside code spans in tables).
fn cell_code(s: &str) -> String {
    code(s).replace('|', "\\|")
}

/// Prose from the schema made safe for Markdown: outside code spans `<` becomes `&lt;` (so that
/// `<name>` is shown, not taken for an HTML tag); in a table cell, `|` is escaped everywhere and
/// line breaks become spaces (a blank line, a paragraph break, becomes `<br><br>`).
pub fn escape(s: &str, in_table: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.trim().chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '`' {
            // A code span runs to the next run of exactly as many backticks; without one, the
            // backticks are literal.
            let run = chars[i..].iter().take_while(|&&c| c == '`').count();
            if let Some(end) = closing_run(&chars, i + run, run) {
                for &c in &chars[i..end + run] {
                    push_cell_char(&mut out, c, in_table);
                }
                i = end + run;
                continue;
            }
            out.extend(std::iter::repeat_n('`', run));
            i += run;
            continue;
        }
        match c {
            '<' => out.push_str("&lt;"),
            '\n' if in_table && chars.get(i + 1) == Some(&'\n') => {
                out.push_str("<br><br>");
                while chars.get(i + 1) == Some(&'\n') {
                    i += 1;
                }
            }
            _ => push_cell_char(&mut out, c, in_table),
        }
        i += 1;
    }
    out
}

fn push_cell_char(out: &mut String, c: char, in_table: bool) {
    match c {
        '|' if in_table => out.push_str("\\|"),
        '\n' if in_table => out.push(' '),
        c => out.push(c),
    }
}

/// Where the run of exactly `run` backticks that closes a code span starts, from `from` on.
fn closing_run(chars: &[char], from: usize, run: usize) -> Option<usize> {
    let mut j = from;
    while j < chars.len() {
        if chars[j] == '`' {
            let n = chars[j..].iter().take_while(|&&c| c == '`').count();
            if n == run {
                return Some(j);
            }
            j += n;
        } else {
            j += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: serde_json::Value) -> JSONSchemaProps {
        serde_json::from_value(v).expect("a schema")
    }

    fn paths(rows: &[Field]) -> Vec<&str> {
        rows.iter().map(|r| r.path.as_str()).collect()
    }

    fn row<'a>(rows: &'a [Field], path: &str) -> &'a Field {
        rows.iter().find(|r| r.path == path).unwrap_or_else(|| panic!("no row {path} in {:?}", paths(rows)))
    }

    #[test]
    fn nested_objects_are_walked_in_name_order_with_their_required_fields() {
        let s = schema(json!({
            "type": "object",
            "required": ["server"],
            "properties": {
                "server": {"type": "string", "maxLength": 2048, "description": "Base URL."},
                "ref": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "key": {"type": "string", "default": "client_secret"}
                    }
                }
            }
        }));
        let rows = fields("spec", &s, true);
        assert_eq!(paths(&rows), ["spec", "spec.ref", "spec.ref.key", "spec.ref.name", "spec.server"]);
        assert_eq!(row(&rows, "spec").presence, "required");
        assert_eq!(row(&rows, "spec.ref").presence, "optional");
        assert_eq!(row(&rows, "spec.ref.name").presence, "required");
        assert_eq!(row(&rows, "spec.ref.name").bounds, ["minLength 1"]);
        assert_eq!(row(&rows, "spec.ref.key").presence, "default `client_secret`");
        assert_eq!(row(&rows, "spec.server").presence, "required");
        assert_eq!(row(&rows, "spec.server").bounds, ["maxLength 2048"]);
        assert_eq!(row(&rows, "spec.server").description, "Base URL.");
    }

    #[test]
    fn arrays_of_objects_get_a_row_per_item_field_and_scalar_items_fold_into_the_array() {
        let s = schema(json!({
            "type": "object",
            "properties": {
                "conditions": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["type"],
                    "items": {
                        "type": "object",
                        "description": "One condition.",
                        "required": ["type"],
                        "properties": {
                            "type": {"type": "string"},
                            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0.0}
                        }
                    }
                },
                "roles": {
                    "type": "array",
                    "maxItems": 32,
                    "items": {"type": "string", "minLength": 1, "maxLength": 128}
                }
            }
        }));
        let rows = fields("status", &s, false);
        assert_eq!(
            paths(&rows),
            [
                "status",
                "status.conditions",
                "status.conditions[]",
                "status.conditions[].observedGeneration",
                "status.conditions[].type",
                "status.roles"
            ]
        );
        let conditions = row(&rows, "status.conditions");
        assert_eq!(conditions.type_name, "array of object");
        assert_eq!(conditions.bounds, ["list type `map`, keyed by `type`"]);
        assert_eq!(row(&rows, "status.conditions[]").description, "One condition.");
        assert_eq!(row(&rows, "status.conditions[].type").presence, "required");
        let generation = row(&rows, "status.conditions[].observedGeneration");
        assert_eq!(generation.type_name, "integer (int64)");
        assert_eq!(generation.bounds, ["minimum 0"]);
        let roles = row(&rows, "status.roles");
        assert_eq!(roles.type_name, "array of string");
        assert_eq!(roles.bounds, ["maxItems 32", "each item: minLength 1, maxLength 128"]);
    }

    #[test]
    fn maps_show_their_values_and_maps_of_objects_are_walked() {
        let s = schema(json!({
            "type": "object",
            "properties": {
                "labels": {
                    "type": "object",
                    "maxProperties": 16,
                    "additionalProperties": {"type": "string", "maxLength": 63},
                    "x-kubernetes-validations": [{"rule": "self.all(k, k.size() <= 317)", "message": "keys are at most 317 characters"}]
                },
                "servers": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {"url": {"type": "string", "pattern": "^https://"}}
                    }
                },
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "port": {"x-kubernetes-int-or-string": true}
            }
        }));
        let rows = fields("spec", &s, false);
        assert_eq!(
            paths(&rows),
            ["spec", "spec.free", "spec.labels", "spec.port", "spec.servers", "spec.servers.*", "spec.servers.*.url"]
        );
        let labels = row(&rows, "spec.labels");
        assert_eq!(labels.type_name, "map of string");
        assert_eq!(
            labels.bounds,
            ["maxProperties 16", "rule: keys are at most 317 characters", "each value: maxLength 63"]
        );
        assert_eq!(row(&rows, "spec.servers").type_name, "map of object");
        assert_eq!(row(&rows, "spec.servers.*.url").bounds, ["pattern `^https://`"]);
        assert_eq!(row(&rows, "spec.free").type_name, "object (any fields)");
        assert_eq!(row(&rows, "spec.port").type_name, "integer or string");
    }

    #[test]
    fn enums_rules_without_messages_and_numbers_are_shown_as_written() {
        let s = schema(json!({
            "type": "string",
            "enum": ["ConfigMap", "Secret"],
            "x-kubernetes-validations": [{"rule": "self != 'x'"}]
        }));
        assert_eq!(fields("kind", &s, false)[0].bounds, ["one of `ConfigMap`, `Secret`", "rule: `self != 'x'`"]);
        let n = schema(json!({"type": "number", "minimum": 0.5, "maximum": 10.0, "exclusiveMaximum": true}));
        assert_eq!(fields("n", &n, false)[0].bounds, ["minimum 0.5", "exclusiveMaximum 10"]);
        let d = schema(json!({"type": "integer", "default": 3}));
        assert_eq!(fields("d", &d, true)[0].presence, "required, default `3`");
    }

    #[test]
    fn table_cells_escape_pipes_line_breaks_and_tags_outside_code() {
        assert_eq!(escape("a | b\nc", true), "a \\| b c");
        assert_eq!(escape("one\n\ntwo", true), "one<br><br>two");
        assert_eq!(
            escape("default <name>-token, or `<name>-token`", true),
            "default &lt;name>-token, or `<name>-token`"
        );
        assert_eq!(escape("`a|b` and ``x`y``", true), "`a\\|b` and ``x`y``");
        assert_eq!(escape("a lone ` backtick <b>", true), "a lone ` backtick &lt;b>");
        // Outside tables, text keeps its lines and pipes.
        assert_eq!(escape("a | b\nc", false), "a | b\nc");
        assert_eq!(code("a`b"), "`` a`b ``");
        assert_eq!(cell_code("^(a|b)$"), "`^(a\\|b)$`");
    }

    #[test]
    fn the_reference_names_every_field_of_the_crd_and_is_deterministic() {
        let md = markdown();
        assert_eq!(md, markdown());
        assert!(md.starts_with("# RegistryAccess field reference\n"));
        assert!(md.ends_with(" |\n") && !md.ends_with("\n\n"), "one trailing newline");
        let crd = RegistryAccess::crd();
        let root = crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap();
        let mut count = 0;
        for part in ["spec", "status"] {
            let schema = &root.properties.as_ref().unwrap()[part];
            for field in fields(part, schema, false) {
                assert!(md.contains(&format!("| {} |", cell_code(&field.path))), "{} missing", field.path);
                count += 1;
            }
        }
        assert!(count > 40, "only {count} fields");
        for expected in [
            "| `spec.clientSecretRef.name` | string | required | minLength 1; maxLength 253; pattern",
            "| `spec.clientAuthMethod` | string | default `client_secret_post` |",
            "| `status.conditions[].type` | string | required |",
            "| `spec.secret.labels` | map of string | optional | maxProperties 16; rule: label keys are at most 317",
            "rule: set tls.caBundle or tls.caBundleRef, not both",
            "### spec\n",
            "### status\n",
        ] {
            assert!(md.contains(expected), "{expected:?} not in the reference");
        }
        // No table row has a raw line break or an unescaped pipe inside a cell.
        for line in md.lines().filter(|l| l.starts_with("| `")) {
            assert_eq!(line.replace("\\|", "").matches('|').count(), 6, "{line}");
        }
    }
}
