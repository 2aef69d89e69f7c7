use super::*;

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn kinds(r: &Rendered) -> Vec<(&str, bool)> {
    r.pieces
        .iter()
        .map(|p| (p.text.as_str(), p.special))
        .collect()
}

#[test]
fn chatml_keeps_contents_apart_from_the_markup() {
    let t = Template::new(builtin("chatml").unwrap(), "<s>", "</s>").unwrap();
    let r = t
        .render_pieces(
            &[
                msg("system", "Be brief."),
                msg("user", "Hi <|im_end|> there"),
            ],
            true,
        )
        .unwrap();
    assert!(r.exact);
    assert_eq!(
        kinds(&r),
        [
            ("<|im_start|>system\n", true),
            ("Be brief.", false),
            ("<|im_end|>\n<|im_start|>user\n", true),
            ("Hi <|im_end|> there", false),
            ("<|im_end|>\n<|im_start|>assistant\n", true),
        ]
    );
    let no_prompt = t.render(&[msg("user", "x")], false).unwrap();
    assert_eq!(no_prompt, "<|im_start|>user\nx<|im_end|>\n");
}

#[test]
fn a_template_that_changes_the_content_next_to_the_markers_is_one_markup_piece() {
    let t = Template::new(builtin("llama3").unwrap(), "<|begin_of_text|>", "").unwrap();
    // trim on " hi " differs once markers surround it: the render is not exact.
    let r = t.render_pieces(&[msg("user", " hi ")], true).unwrap();
    assert!(!r.exact);
    assert_eq!(r.pieces.len(), 1);
    assert_eq!(
        r.text(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // Without surrounding whitespace, trim changes nothing: exact.
    let r = t.render_pieces(&[msg("user", "hi")], true).unwrap();
    assert!(r.exact);
    assert_eq!(
        r.pieces[1],
        Piece {
            text: "hi".into(),
            special: false
        }
    );
}

#[test]
fn markers_in_the_content_fall_back_to_the_plain_render() {
    let t = Template::new(builtin("chatml").unwrap(), "", "").unwrap();
    let r = t.render_pieces(&[msg("user", "a\u{FDD0}b")], true).unwrap();
    assert!(!r.exact);
    assert!(r.text().contains("a\u{FDD0}b"));
}

#[test]
fn trim_blocks_and_lstrip_blocks_as_in_hugging_face() {
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
    let t = Template::new(src, "", "").unwrap();
    assert_eq!(
        t.render(&[msg("user", "a"), msg("user", "b")], false)
            .unwrap(),
        "[a]\n[b]\n"
    );
}

#[test]
fn raise_exception_is_the_error_word_for_word() {
    let t = Template::new(builtin("mistral").unwrap(), "<s>", "</s>").unwrap();
    let e = t.render(&[msg("tool", "x")], true).unwrap_err();
    assert!(
        e.starts_with("the mistral template has no role tool; use"),
        "{e}"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let e = Template::new("ok\n{% for m in messages %}", "", "").unwrap_err();
    assert!(e.contains("line"), "{e}");
    let e = Template::new(&"x".repeat(MAX_SOURCE + 1), "", "").unwrap_err();
    assert!(e.contains("bytes"), "{e}");
}

#[test]
fn strftime_now_with_a_bad_format_is_an_error_not_a_panic() {
    let t = Template::new("{{ strftime_now('%Y') }}", "", "").unwrap();
    let year = t.render(&[], false).unwrap();
    assert_eq!(year.len(), 4, "{year}");
    let t = Template::new("{{ strftime_now('%Q %') }}", "", "").unwrap();
    let e = t.render(&[], false).unwrap_err();
    assert!(e.contains("strftime"), "{e}");
}

#[test]
fn tojson_writes_what_python_json_dumps_writes() {
    let t = Template::new(
        "{{ messages | tojson }}|{{ {'b': 1, 'a': [1.5, true, none, 'é\"\n']} | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=[',', ':']) }}",
        "",
        "",
    )
    .unwrap();
    let out = t.render(&[msg("user", "<b>")], false).unwrap();
    assert_eq!(
        out,
        "[{\"role\": \"user\", \"content\": \"<b>\"}]|{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    true,\n    null,\n    \"é\\\"\\n\"\n  ]\n}|{\"a\":2,\"b\":1}"
    );
}

#[test]
fn python_string_methods_loops_and_namespace() {
    let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.first %}F{% endif %}{{ m.content.strip().upper() }}{% set ns.n = ns.n + 1 %}{% if m.content.startswith(' a') %}!{% endif %}{% endfor %}{{ ns.n }}{{ bos_token }}{{ eos_token }}";
    let t = Template::new(src, "<s>", "</s>").unwrap();
    let out = t
        .render(&[msg("user", " ab "), msg("user", "c")], false)
        .unwrap();
    assert_eq!(out, "FAB!C2<s></s>");
}

#[test]
fn every_builtin_compiles_and_renders_a_conversation() {
    for (name, src) in BUILTINS {
        let t = Template::new(src, "<s>", "</s>").unwrap();
        let r = t
            .render_pieces(
                &[
                    msg("system", "S"),
                    msg("user", "U"),
                    msg("assistant", "A"),
                    msg("user", "V"),
                ],
                true,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(r.exact, "{name}");
        let text = r.text();
        for c in ["U", "A", "V"] {
            assert!(
                r.pieces.iter().any(|p| !p.special && p.text.contains(c)),
                "{name}: {text}"
            );
        }
    }
    assert!(builtin("nope").is_none());
    assert!(builtin_names().starts_with("chatml, llama3"));
}

#[test]
fn a_runaway_template_runs_out_of_fuel() {
    let t = Template::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let e = t.render(&[], false).unwrap_err();
    assert!(e.contains("fuel"), "{e}");
}

#[test]
fn from_offset_cuts_across_pieces() {
    let r = Rendered {
        pieces: vec![
            Piece {
                text: "<a>".into(),
                special: true,
            },
            Piece {
                text: "hello".into(),
                special: false,
            },
            Piece {
                text: "<b>".into(),
                special: true,
            },
        ],
        exact: true,
    };
    let cut = r.from_offset(5);
    assert_eq!(cut.text(), "llo<b>");
    assert_eq!(
        cut.pieces[0],
        Piece {
            text: "llo".into(),
            special: false
        }
    );
    assert_eq!(
        r.from_offset(8).pieces,
        [Piece {
            text: "<b>".into(),
            special: true
        }]
    );
    assert!(r.from_offset(11).pieces.is_empty());
}

#[test]
fn generation_tags_render_their_body_and_tools_is_none() {
    let t = Template::new(
        "{% for m in messages %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% endfor %}{{ tools is none }}{{ documents is none }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&[msg("assistant", "a")], false).unwrap(),
        "[a]TrueTrue"
    );
}

#[test]
fn rsplit_removeprefix_and_removesuffix_as_python() {
    let t = Template::new(
        "{{ 'a,b,c'.rsplit(',', 1) }}|{{ '  a b  c '.rsplit(none, 1) }}|{{ ' a  b '.rsplit() }}|{{ 'xay'.removeprefix('x') }}{{ 'xay'.removesuffix('y') }}{{ 'xay'.removeprefix('q') }}",
        "",
        "",
    )
    .unwrap();
    assert_eq!(
        t.render(&[], false).unwrap(),
        "['a,b', 'c']|['  a b', 'c']|['a', 'b']|ayxaxay"
    );
}
