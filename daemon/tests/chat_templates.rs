//! Released chat templates (Qwen3, Llama 3.2; tests/fixtures/chat/) rendered by halod's minijinja
//! environment must give exactly what transformers' renderer gives (refs.json, written by
//! gen_chat_refs.py): the Python string methods, namespaces, reversed slices, `trim` and the
//! date these templates use.

use std::path::PathBuf;

use halod::llm::chat::{ChatTemplate, Message};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

#[test]
fn released_templates_render_as_transformers_renders_them() {
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("refs.json")).unwrap()).unwrap();
    // Today's date as the templates' strftime_now("%d %b %Y") gives it, to put the reference's
    // placeholder in its place.
    let today = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "")
        .unwrap()
        .render(&[], false)
        .unwrap();
    let templates = refs["templates"].as_object().unwrap();
    assert_eq!(templates.len(), 2);
    for (name, t) in templates {
        let source = std::fs::read_to_string(dir().join(name)).unwrap();
        let tmpl = ChatTemplate::new(
            &source,
            t["bos_token"].as_str().unwrap(),
            t["eos_token"].as_str().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in t["cases"].as_array().unwrap() {
            let messages: Vec<Message> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            for (agp, key) in [
                (true, "with_generation_prompt"),
                (false, "without_generation_prompt"),
            ] {
                let got = tmpl
                    .render(&messages, agp)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                    .replace(&today, "@@DATE@@");
                assert_eq!(
                    got,
                    case[key].as_str().unwrap(),
                    "{name}, {key}, {} messages",
                    messages.len()
                );
            }
        }
    }
}
