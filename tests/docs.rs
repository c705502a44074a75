//! The documentation is checked like the code: `docs/reference.md` is exactly what the CRD
//! generates, and every link in README.md and docs/*.md leads somewhere.
//!
//! Links checked: inline links and images (`[text](target)`), reference definitions
//! (`[label]: target`) and bare or angle-bracketed `http(s)://` URLs, outside fenced code blocks,
//! code spans and HTML comments. A relative target must be an existing file or folder of the
//! repository; a `#anchor` in a Markdown file (the same page or another) must be one of its
//! headings as GitHub names them: the heading's text lowercased, spaces turned into `-`, every
//! character but letters, digits, `-` and `_` dropped, and `-1`, `-2`... added to repeated ones.
//! Headings are ATX headings (`## Title`), the only kind these docs use; `<a id="...">` and
//! `<a name="...">` count too. External links are not fetched (the tests have no internet), but
//! must be well-formed http(s) URLs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_field_reference_is_generated_from_the_crd() {
    let path = Path::new(ROOT).join("docs/reference.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = registry_access_operator::reference::markdown();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| committed.lines().count().min(generated.lines().count()) + 1, |i| i + 1);
        panic!(
            "docs/reference.md is not what the CRD generates (first difference at line {line}): run `make docs`\n\
             committed: {:?}\ngenerated: {:?}",
            committed.lines().nth(line - 1).unwrap_or("<end of file>"),
            generated.lines().nth(line - 1).unwrap_or("<end of file>"),
        );
    }
}

#[test]
fn every_link_in_the_docs_resolves() {
    let root = Path::new(ROOT);
    let mut files = vec![root.join("README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("read docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "no pages in docs/");
    files.extend(pages);

    let mut anchors: HashMap<PathBuf, Vec<String>> = HashMap::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a page");
        let name = file.strip_prefix(root).unwrap_or(file).display().to_string();
        for link in links(&text) {
            checked += 1;
            if let Err(why) = check(root, file, &link.target, &mut anchors) {
                problems.push(format!("{name}:{}: {}: {why}", link.line, link.target));
            }
        }
    }
    assert!(checked > 20, "only {checked} links found: is the link parser broken?");
    assert!(problems.is_empty(), "{} broken links in the docs:\n{}", problems.len(), problems.join("\n"));
}

/// A link target and the line it is on.
#[derive(Debug, PartialEq, Eq)]
struct Link {
    line: usize,
    target: String,
}

/// Whether `target`, linked from `from`, leads somewhere.
fn check(root: &Path, from: &Path, target: &str, anchors: &mut HashMap<PathBuf, Vec<String>>) -> Result<(), String> {
    if target.is_empty() {
        return Err("empty link".to_owned());
    }
    if let Some(scheme) = scheme(target) {
        return match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => valid_url(target),
            "mailto" if target.contains('@') => Ok(()),
            _ => Err(format!("unsupported link scheme `{scheme}:`")),
        };
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let path = path.split('?').next().unwrap_or_default();
    let file = if path.is_empty() {
        from.to_path_buf()
    } else {
        let decoded = path.replace("%20", " ");
        let base = if let Some(abs) = decoded.strip_prefix('/') {
            root.join(abs)
        } else {
            from.parent().expect("a page is in a folder").join(&decoded)
        };
        let resolved = normalise(&base).ok_or("leads above the repository")?;
        if !resolved.starts_with(root) {
            return Err("leads outside the repository".to_owned());
        }
        if !resolved.exists() {
            return Err(format!("no such file: {}", resolved.strip_prefix(root).unwrap_or(&resolved).display()));
        }
        resolved
    };
    let Some(anchor) = anchor else { return Ok(()) };
    if anchor.is_empty() {
        return Err("empty anchor".to_owned());
    }
    if file.extension().is_none_or(|e| e != "md") {
        // GitHub's line anchors (`#L10`, `#L10-L20`) into source files.
        let line_anchor = anchor
            .split('-')
            .all(|part| part.strip_prefix('L').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())));
        return if line_anchor { Ok(()) } else { Err(format!("`#{anchor}` into a file that is not Markdown")) };
    }
    let known =
        anchors.entry(file.clone()).or_insert_with(|| headings(&std::fs::read_to_string(&file).unwrap_or_default()));
    if known.iter().any(|a| a == anchor) {
        Ok(())
    } else {
        let page = file.strip_prefix(root).unwrap_or(&file).display().to_string();
        let near: Vec<&String> = known.iter().filter(|a| a.contains(anchor) || anchor.contains(a.as_str())).collect();
        Err(format!(
            "no heading `#{anchor}` in {page}{}",
            if near.is_empty() { String::new() } else { format!(" (near: {near:?})") }
        ))
    }
}

/// `path` with `.` and `..` resolved, without touching the file system.
fn normalise(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// The scheme of an absolute URL (`https` of `https://...`), if the target has one.
fn scheme(target: &str) -> Option<&str> {
    let (scheme, _) = target.split_once(':')?;
    let mut chars = scheme.chars();
    (chars.next()?.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c)))
        .then_some(scheme)
}

/// A syntactically valid http(s) URL with a host.
fn valid_url(target: &str) -> Result<(), String> {
    if target.chars().any(|c| c.is_whitespace() || c.is_control() || "<>\"`{}|\\^".contains(c)) {
        return Err("a URL may not hold spaces or any of <>\"`{}|\\^".to_owned());
    }
    let url = reqwest::Url::parse(target).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("not an http(s) URL".to_owned());
    }
    match url.host_str() {
        Some(host) if !host.is_empty() && !host.starts_with('.') && !host.ends_with('.') && !host.contains("..") => {
            Ok(())
        }
        _ => Err("a URL without a valid host".to_owned()),
    }
}

/// The anchors of a Markdown page, as GitHub names them.
fn headings(text: &str) -> Vec<String> {
    let text = without_code_blocks_and_comments(text);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start_matches(' ');
        if line.len() - trimmed.len() <= 3 {
            let hashes = trimmed.bytes().take_while(|&b| b == b'#').count();
            let rest = &trimmed[hashes..];
            if (1..=6).contains(&hashes) && (rest.is_empty() || rest.starts_with([' ', '\t'])) {
                anchors.push(unique(&mut seen, slug(heading_text(rest))));
            }
        }
        // Explicit HTML anchors.
        for attr in ["id=\"", "name=\""] {
            for (i, _) in line.match_indices(&format!("<a {attr}")) {
                let start = i + 3 + attr.len();
                if let Some(end) = line[start..].find('"') {
                    anchors.push(line[start..start + end].to_owned());
                }
            }
        }
    }
    anchors
}

/// A heading's text without the optional closing `#`s, with links reduced to their text.
fn heading_text(rest: &str) -> String {
    let mut text = rest.trim();
    let without_closing = text.trim_end_matches('#');
    if without_closing.is_empty() || without_closing.ends_with([' ', '\t']) {
        text = without_closing.trim_end();
    }
    // `[text](target)` and `![alt](src)` show only their text.
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else { break };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else { break };
        out.push_str(rest[..open].strip_suffix('!').unwrap_or(&rest[..open]));
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// GitHub's anchor for a heading's text.
fn slug(text: String) -> String {
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// `slug`, or `slug-1`, `slug-2`... when the page already has it.
fn unique(seen: &mut BTreeMap<String, usize>, slug: String) -> String {
    let mut candidate = slug.clone();
    while seen.contains_key(&candidate) {
        let n = seen.get_mut(&slug).expect("the original is seen");
        *n += 1;
        candidate = format!("{slug}-{n}");
    }
    seen.insert(candidate.clone(), 0);
    candidate
}

/// The text with fenced code blocks and HTML comments blanked, line breaks kept (so that line
/// numbers stay right).
fn without_code_blocks_and_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<(char, usize)> = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start_matches(' ');
        let indent = line.len() - trimmed.len();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |m| trimmed.chars().take_while(|&c| c == m).count());
        match fence {
            None if indent <= 3 && run >= 3 => fence = marker.map(|m| (m, run)),
            Some((m, n)) if indent <= 3 && marker == Some(m) && run >= n && trimmed[run..].trim().is_empty() => {
                fence = None
            }
            Some(_) => {}
            None => {
                out.push_str(line);
                continue;
            }
        }
        out.push_str(if line.ends_with('\n') { "\n" } else { "" });
    }
    // HTML comments.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(start) = rest.find("<!--") {
        result.push_str(&rest[..start]);
        let end = rest[start..].find("-->").map_or(rest.len(), |e| start + e + 3);
        result.extend(rest[start..end].chars().filter(|&c| c == '\n'));
        rest = &rest[end..];
    }
    result.push_str(rest);
    result
}

/// The text with code spans blanked (their backticks and content become spaces; line breaks
/// kept).
fn without_code_spans(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' && chars.get(i + 1) == Some(&'`') {
            out.push_str("\\`");
            i += 2;
            continue;
        }
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let n = chars[j..].iter().take_while(|&&c| c == '`').count();
                if n == run {
                    close = Some(j);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.extend(chars[i..end + run].iter().map(|&c| if c == '\n' { '\n' } else { ' ' }));
                i = end + run;
            }
            None => {
                out.extend(std::iter::repeat_n('`', run));
                i += run;
            }
        }
    }
    out
}

/// Every link of a page: inline links and images, reference definitions, bare and
/// angle-bracketed http(s) URLs.
fn links(text: &str) -> Vec<Link> {
    let prose = without_code_spans(&without_code_blocks_and_comments(text));
    let line_of = |offset: usize| prose[..offset].matches('\n').count() + 1;
    let mut found = Vec::new();
    // Destinations already taken by inline links, blanked before looking for bare URLs.
    let mut blanked = prose.clone().into_bytes();
    for (i, _) in prose.match_indices("](") {
        let start = i + 2;
        let Some((target, end)) = destination(&prose[start..]) else { continue };
        found.push((start, target));
        blanked[start..start + end].fill(b' ');
    }
    let mut offset = 0;
    for line in prose.split_inclusive('\n') {
        let trimmed = line.trim_start_matches(' ');
        if line.len() - trimmed.len() <= 3
            && let Some(rest) = trimmed.strip_prefix('[')
            && let Some((label, after)) = rest.split_once("]:")
            && !label.is_empty()
            && !label.starts_with('^')
        {
            let target = after.split_whitespace().next().unwrap_or_default();
            let target = target.trim_start_matches('<').trim_end_matches('>');
            let at = offset + line.len() - after.len();
            found.push((at, target.to_owned()));
            blanked[at..offset + line.len()].fill(b' ');
        }
        offset += line.len();
    }
    let rest = String::from_utf8(blanked).expect("only ASCII bytes were replaced");
    for scheme in ["http://", "https://"] {
        for (i, _) in rest.match_indices(scheme) {
            let url: String = rest[i..].chars().take_while(|c| !c.is_whitespace() && *c != '<' && *c != '>').collect();
            found.push((i, trim_autolink(&url).to_owned()));
        }
    }
    found.sort();
    found.into_iter().map(|(at, target)| Link { line: line_of(at), target }).collect()
}

/// The destination of an inline link, from just after its `(`: the target and how many bytes of
/// the text it took (through the closing `)`).
fn destination(s: &str) -> Option<(String, usize)> {
    let leading = s.len() - s.trim_start().len();
    let body = &s[leading..];
    if let Some(inner) = body.strip_prefix('<') {
        let end = inner.find('>')?;
        let close = inner[end..].find(')')? + end;
        return Some((inner[..end].to_owned(), leading + 1 + close + 1));
    }
    let mut depth = 0usize;
    for (i, c) in body.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some((body[..i].to_owned(), leading + i + 1)),
            ')' => depth -= 1,
            c if c.is_whitespace() => {
                // A title may follow: `(target "title")`; anything else makes no link, so the
                // whole text is returned, to be reported.
                let close = body[i..].find(')')? + i;
                let title = body[i..close].trim();
                let target =
                    if title.is_empty() || title.starts_with(['"', '\'', '(']) { &body[..i] } else { &body[..close] };
                return Some((target.to_owned(), leading + close + 1));
            }
            _ => {}
        }
    }
    None
}

/// A bare URL as GitHub links it: without trailing punctuation, nor a `)` it does not open.
fn trim_autolink(url: &str) -> &str {
    let mut url = url.trim_end_matches(['.', ',', ':', ';', '!', '?', '*', '_', '~', '\'', '"']);
    while url.ends_with(')') && url.matches(')').count() > url.matches('(').count() {
        url = url[..url.len() - 1].trim_end_matches(['.', ',', ':', ';', '!', '?', '*', '_', '~', '\'', '"']);
    }
    url
}

#[test]
fn slugs_follow_githubs_rules() {
    let text = "# Install\n## What the RBAC grants, and why\n### `kubectl registry-access`\n## Install\n\
                ## Install\n## Sizing the pace ##\n## A [link](x.md) and _under_score\n## Ünïcode déjà vu\n\
                ```\n# not a heading\n```\n<!-- # nor this -->\n#hashtag is not a heading\n";
    assert_eq!(
        headings(text),
        [
            "install",
            "what-the-rbac-grants-and-why",
            "kubectl-registry-access",
            "install-1",
            "install-2",
            "sizing-the-pace",
            "a-link-and-_under_score",
            "ünïcode-déjà-vu"
        ]
    );
    let mut seen = BTreeMap::new();
    assert_eq!(unique(&mut seen, "a".into()), "a");
    assert_eq!(unique(&mut seen, "a-1".into()), "a-1");
    assert_eq!(unique(&mut seen, "a".into()), "a-2");
}

#[test]
fn links_are_found_outside_code_only() {
    let text = "See [the guide](docs/tenant-guide.md#events) and [Status](#status \"title\"),\n\
                ![img](a_(b).png) `[not](a-link.md)` and <https://example.com/x>.\n\
                ```sh\n[no](fence.md)\n```\n\
                Visit https://example.org/path). [ref]: not-a-definition [bad](https://exa mple.com)\n\
                [def]: docs/operations.md\n";
    let found = links(text);
    let found: Vec<(usize, &str)> = found.iter().map(|l| (l.line, l.target.as_str())).collect();
    assert_eq!(
        found,
        [
            (1, "docs/tenant-guide.md#events"),
            (1, "#status"),
            (2, "a_(b).png"),
            (2, "https://example.com/x"),
            (6, "https://example.org/path"),
            (6, "https://exa mple.com"),
            (7, "docs/operations.md"),
        ]
    );
}

#[test]
fn external_links_must_be_well_formed() {
    assert!(valid_url("https://github.com/kubernetes/kubernetes").is_ok());
    assert!(valid_url("http://127.0.0.1:8081/metrics").is_ok());
    assert!(valid_url("https://").is_err());
    assert!(valid_url("https://exa mple.com").is_err());
    assert!(valid_url("https://example..com/").is_err());
    assert!(valid_url("https://[::1/").is_err());
    let root = Path::new(ROOT);
    let mut anchors = HashMap::new();
    let readme = root.join("README.md");
    assert!(check(root, &readme, "ftp://example.com", &mut anchors).is_err());
    assert!(check(root, &readme, "docs/no-such-page.md", &mut anchors).is_err());
    assert!(check(root, &readme, "../../etc/passwd", &mut anchors).is_err());
    assert!(check(root, &readme, "#no-such-heading-anywhere", &mut anchors).is_err());
    assert!(check(root, &readme, "Makefile#L1", &mut anchors).is_ok());
    assert!(check(root, &readme, "docs/reference.md#spec", &mut anchors).is_ok());
}
