//! Chat templates: a conversation (`messages`: role/content) rendered with the model's Jinja template as
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, `raise_exception`,
//! `strftime_now`, Python's string methods, `tojson` as Python's `json.dumps`), with the byte ranges the
//! assistant wrote.
//!
//! The assistant's ranges come from the template's `{% generation %}` blocks where it has them (what
//! transformers' `return_assistant_tokens_mask` reads). Elsewhere each assistant message i is found by
//! rendering the conversation up to it: its range runs from the end of messages `..i` rendered with the
//! generation prompt to the end of messages `..=i`; a template whose renderings of a conversation's prefixes
//! are not prefixes of its whole rendering is refused (it needs `{% generation %}` blocks).

use super::tokenizer::Specials;
use minijinja::{Environment, ErrorKind, Value};
use std::ops::Range;

/// Marks the start and end of a `{% generation %}` block in the rendered text (noncharacters that no
/// message may contain).
const GEN_START: char = '\u{10FFFE}';
const GEN_END: char = '\u{10FFFF}';
/// Roles a message may have.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file, or tokenizer_config.json's chat_template).
    pub origin: String,
    has_generation: bool,
}

/// A rendered conversation and the byte ranges of the assistant's text in it.
pub struct Rendered {
    pub text: String,
    pub assistant: Vec<Range<usize>>,
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (with any `-` whitespace control) by a filter block
/// that marks its output; returns whether there was one.
fn mark_generation(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(close) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..close];
        let (lead, body) = inner.strip_prefix('-').map_or(("", inner), |b| ("-", b));
        let (body, trail) = body.strip_suffix('-').map_or((body, ""), |b| (b, "-"));
        match body.trim() {
            "generation" => {
                found = true;
                out.push_str(&format!("{{%{lead} filter strata_generation {trail}%}}"));
            }
            "endgeneration" => out.push_str(&format!("{{%{lead} endfilter {trail}%}}")),
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: `", "` and `": "` between items.
fn python_json(value: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (k, v) in items.iter().enumerate() {
                out.push_str(if k > 0 { sep } else { "" });
                newline(out, depth + 1);
                python_json(v, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (k, (key, v)) in map.iter().enumerate() {
                out.push_str(if k > 0 { sep } else { "" });
                newline(out, depth + 1);
                out.push_str(&J::String(key.clone()).to_string());
                out.push_str(": ");
                python_json(v, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    for key in ["ensure_ascii", "separators", "sort_keys"] {
        let _: Option<Value> = kwargs.get(key)?;
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(out)
}

/// Today's date and time in `format` (C's strftime, local time), as transformers' `strftime_now`.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let bad = |m: &str| minijinja::Error::new(ErrorKind::InvalidOperation, m.to_string());
    let c_format = std::ffi::CString::new(format).map_err(|_| bad("a NUL in the format"))?;
    let mut buf = [0u8; 512];
    // SAFETY: `time` with a null pointer only returns the time; `localtime_r` writes the zero-initialised `tm`
    // we own; `strftime` writes at most `buf.len()` bytes into `buf` and reads the NUL-terminated format.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(bad("the local time is not known"));
        }
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), c_format.as_ptr(), &tm)
    };
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names `origin` and the template's line.
    pub fn new(source: &str, origin: String) -> Result<ChatTemplate, String> {
        let (marked, has_generation) = mark_generation(source);
        let mut env = Environment::new();
        let syntax = env
            .syntax()
            .to_builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| format!("{origin}: {e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter("strata_generation", |body: String| {
            format!("{GEN_START}{body}{GEN_END}")
        });
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat_template", marked)
            .map_err(|e| format!("{origin}: {e}"))?;
        Ok(ChatTemplate {
            env,
            origin,
            has_generation,
        })
    }

    fn render_raw(
        &self,
        messages: &[serde_json::Value],
        specials: &Specials,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let template = self
            .env
            .get_template("chat_template")
            .map_err(|e| e.to_string())?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => Value::from(()),
            documents => Value::from(()),
            bos_token => specials.bos.clone(),
            eos_token => specials.eos.clone(),
            unk_token => specials.unk.clone(),
            pad_token => specials.pad.clone(),
        };
        template.render(ctx).map_err(|e| {
            let mut message = format!("the chat template ({}) failed: {e}", self.origin);
            if let Some(detail) = std::error::Error::source(&e) {
                message.push_str(&format!(": {detail}"));
            }
            message
        })
    }

    /// Renders `messages` (already checked: objects with a known role) and finds the assistant's ranges.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        specials: &Specials,
    ) -> Result<Rendered, String> {
        let raw = self.render_raw(messages, specials, false)?;
        if self.has_generation {
            return Ok(strip_marks(&raw));
        }
        let mut assistant = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
                continue;
            }
            let before = self.render_raw(&messages[..i], specials, true)?;
            let through = self.render_raw(&messages[..=i], specials, false)?;
            if !through.starts_with(&before) || !raw.starts_with(&through) {
                return Err(format!(
                    "the chat template ({}) renders message {i} differently as the conversation goes on, so \
                     the assistant's text cannot be found: give a template with {{% generation %}} blocks (--template)",
                    self.origin
                ));
            }
            assistant.push(before.len()..through.len());
        }
        Ok(Rendered {
            text: raw,
            assistant,
        })
    }
}

/// Removes the generation marks, returning the text and the ranges they enclosed.
fn strip_marks(raw: &str) -> Rendered {
    let mut text = String::with_capacity(raw.len());
    let mut assistant = Vec::new();
    let mut start = None;
    for c in raw.chars() {
        match c {
            GEN_START => start = Some(text.len()),
            GEN_END => {
                if let Some(s) = start.take() {
                    assistant.push(s..text.len());
                }
            }
            c => text.push(c),
        }
    }
    Rendered { text, assistant }
}

/// Checks a conversation: a list of objects with a known `role` and no generation marks in any string;
/// keys whose value is null are dropped (as transformers does).
pub fn check_messages(messages: &serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
    let list = messages
        .as_array()
        .ok_or("\"messages\" is not a list of messages")?;
    if list.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let obj = m
            .as_object()
            .ok_or_else(|| format!("message {i} is not an object with \"role\" and \"content\""))?;
        let role = obj
            .get("role")
            .and_then(|r| r.as_str())
            .ok_or_else(|| format!("message {i} has no \"role\""))?;
        if !ROLES.contains(&role) {
            return Err(format!(
                "message {i} has the unknown role {role:?} (known: {})",
                ROLES.join(", ")
            ));
        }
        if m.to_string().contains([GEN_START, GEN_END]) {
            return Err(format!(
                "message {i} contains U+10FFFE or U+10FFFF, which strata reserves"
            ));
        }
        let kept: serde_json::Map<_, _> = obj
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.push(serde_json::Value::Object(kept));
    }
    Ok(out)
}

/// Mask bytes for tokens at `offsets`: 1 for a token that overlaps one of `spans` (sorted), as transformers'
/// `return_assistant_tokens_mask` marks them.
pub fn mask_of(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<u8> {
    let mut mask = vec![0u8; offsets.len()];
    let mut k = 0;
    for (m, &(start, end)) in mask.iter_mut().zip(offsets) {
        while k < spans.len() && start >= spans[k].end {
            k += 1;
        }
        if k == spans.len() {
            break;
        }
        if end > spans[k].start {
            *m = 1;
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_marking_filters() {
        let (s, found) =
            mark_generation("a{%- generation -%}b{% endgeneration %}{% if x %}c{% endif %}");
        assert!(found);
        assert_eq!(
            s,
            "a{%- filter strata_generation -%}b{% endfilter %}{% if x %}c{% endif %}"
        );
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}!{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
            "test".into(),
        )
        .unwrap();
        let msgs = check_messages(&serde_json::json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": " yo "}
        ]))
        .unwrap();
        let r = t.render(&msgs, &Specials::default()).unwrap();
        assert_eq!(r.text, "<user>hi<assistant>yo!");
        assert_eq!(r.assistant, vec![19..22]);
    }

    #[test]
    fn python_json_spacing() {
        let mut s = String::new();
        python_json(
            &serde_json::json!({"a": [1, "é"], "b": {}}),
            None,
            0,
            &mut s,
        );
        assert_eq!(s, r#"{"a": [1, "é"], "b": {}}"#);
    }

    #[test]
    fn tokens_overlapping_a_span_are_marked() {
        let offsets = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)];
        assert_eq!(mask_of(&offsets, &[3..7, 9..9]), vec![0, 1, 1, 1, 0]);
        assert_eq!(mask_of(&offsets, &[0..2, 8..9]), vec![1, 0, 0, 0, 1]);
    }
}
