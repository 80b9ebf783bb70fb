"""Record formats: TRL standard / implicit / conversational, Anthropic HH, unpaired, SFT."""

import pytest
from data_helpers import build_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.data_utils import apply_chat_template as trl_apply_chat_template
from trl.data_utils import extract_prompt as trl_extract_prompt

from dpo_jax.data import formats
from dpo_jax.data.examples import (
    BadRecordCounter,
    Location,
    PreferenceExample,
    RecordError,
    SFTExample,
    UnpairedExample,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def msg(role, content):
    return {"role": role, "content": content}


# ----------------------------------------------------------------------------- standard


def test_standard_record():
    ex = formats.parse_preference({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"})
    assert ex == PreferenceExample("Q: 2+2?", " 4", " 5")
    assert formats.detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "standard"


@pytest.mark.parametrize(
    "record, reason, field",
    [
        ({"prompt": "p", "rejected": "r"}, "missing_field", "chosen"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "missing_field", "chosen"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "not_a_string", "chosen"),
        ({"prompt": ["p"], "chosen": "c", "rejected": "r"}, "not_a_string", "prompt"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty_field", "chosen"),
        ({"prompt": "p", "chosen": "c", "rejected": "  \n"}, "empty_field", "rejected"),
        (
            {"prompt": "p", "chosen": " same", "rejected": " same"},
            "identical_responses",
            "rejected",
        ),
    ],
)
def test_standard_bad_records_name_file_line_field(record, reason, field):
    loc = Location("data/train.jsonl", 17, "line")
    with pytest.raises(RecordError) as info:
        formats.parse_preference(record, format="standard", location=loc)
    err = info.value
    assert (err.reason, err.field, err.file, err.index) == (reason, field, "data/train.jsonl", 17)
    assert "data/train.jsonl, line 17" in str(err) and repr(field) in str(err)


def test_unknown_format_errors():
    with pytest.raises(RecordError, match="unknown_format"):
        formats.parse_preference({"text": "hello"})
    with pytest.raises(ValueError, match="unknown record format"):
        formats.parse_preference({"prompt": "a", "chosen": "b", "rejected": "c"}, format="nope")


@pytest.mark.parametrize(
    "record",
    [{"prompt": "Q", "completion": " A"}, {"prompt": "Q", "completion": " A", "label": True}],
)
def test_prompt_completion_record_in_preference_data_is_a_record_error(record):
    loc = Location("prefs.jsonl", 3, "line")
    with pytest.raises(RecordError) as info:
        formats.parse_preference(record, location=loc)
    err = info.value
    assert (err.reason, err.field, err.file, err.index) == (
        "not_a_preference_record",
        "chosen",
        "prefs.jsonl",
        3,
    )
    assert "prefs.jsonl, line 3, field 'chosen'" in str(err)


# ----------------------------------------------------------------------------- implicit prompt


def test_implicit_prompt_moves_space_to_responses():
    ex = formats.parse_preference({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    # TRL: common prefix "The sky is " minus the space right before the difference.
    assert ex == PreferenceExample("The sky is", " blue.", " green.")


def test_implicit_prompt_one_is_prefix_of_other_matches_trl():
    rec = {"chosen": "Answer: yes", "rejected": "Answer: yes, sure"}
    ours = formats.extract_prompt(rec["chosen"], rec["rejected"])
    theirs = trl_extract_prompt(rec)
    assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    assert ours == ("Answer: ye", "s", "s, sure")


texts = st.text(alphabet="ab c", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(prefix=texts, c=texts, r=texts)
def test_implicit_prompt_equals_trl_and_longest_common_prefix(prefix, c, r):
    chosen, rejected = prefix + c, prefix + r
    p, c_rest, r_rest = formats.extract_prompt(chosen, rejected)
    assert p + c_rest == chosen and p + r_rest == rejected
    lcp = 0
    while lcp < min(len(chosen), len(rejected)) and chosen[lcp] == rejected[lcp]:
        lcp += 1
    if lcp < min(len(chosen), len(rejected)) and lcp > 0:
        # A real divergence: the prompt is the longest common prefix, minus one trailing space.
        expected = lcp - 1 if chosen[lcp - 1] == " " else lcp
        assert len(p) == expected
        theirs = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
        assert (p, c_rest, r_rest) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    elif lcp == min(len(chosen), len(rejected)):
        # One is a prefix of the other (or equal): TRL stops one item early.
        assert len(p) == lcp - 1
        theirs = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
        assert (p, c_rest, r_rest) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    else:  # differs at the first character: deliberate deviation from TRL's index -1 read
        assert p == ""


def test_implicit_conversation_prompt_equals_trl():
    chosen = [
        msg("user", "Hi"),
        msg("assistant", "Hello!"),
        msg("user", "Sky?"),
        msg("assistant", "Blue."),
    ]
    rejected = chosen[:3] + [msg("assistant", "Green.")]
    ours = formats.extract_prompt(chosen, rejected)
    theirs = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    assert ours[0] == chosen[:3]


# ----------------------------------------------------------------------------- conversational


@pytest.mark.parametrize("multi_turn", [False, True])
def test_conversational_matches_trl_apply_chat_template(tokenizer, multi_turn):
    prompt = [msg("user", "What color is the sky?")]
    if multi_turn:
        prompt = [
            msg("system", "Be brief."),
            msg("user", "Hi"),
            msg("assistant", "Hello."),
            msg("user", "What color is the sky?"),
        ]
    rec = {
        "prompt": prompt,
        "chosen": [msg("assistant", "It is blue.")],
        "rejected": [msg("assistant", "It is green.")],
    }
    assert formats.detect_format(rec) == "conversational"
    ex = formats.parse_preference(rec, tokenizer=tokenizer)
    theirs = trl_apply_chat_template(rec, tokenizer)
    assert (ex.prompt, ex.chosen, ex.rejected) == (
        theirs["prompt"],
        theirs["chosen"],
        theirs["rejected"],
    )
    assert ex.templated
    assert ex.prompt.endswith("<|im_start|>assistant\n")
    assert ex.chosen == "It is blue.<|im_end|>\n"


def test_conversational_implicit_prompt_matches_trl(tokenizer):
    base = [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Sky?")]
    rec = {
        "chosen": base + [msg("assistant", "Blue.")],
        "rejected": base + [msg("assistant", "Green.")],
    }
    ex = formats.parse_preference(rec, tokenizer=tokenizer)
    # TRL's DPO trainer extracts the prompt first, then renders.
    theirs = trl_apply_chat_template(trl_extract_prompt(rec), tokenizer)
    assert (ex.prompt, ex.chosen, ex.rejected) == (
        theirs["prompt"],
        theirs["chosen"],
        theirs["rejected"],
    )


def test_conversational_assistant_last_prompt_continues_message(tokenizer):
    rec = {
        "prompt": [msg("user", "Sky?"), msg("assistant", "It is")],
        "chosen": [msg("assistant", " blue.")],
        "rejected": [msg("assistant", " red.")],
    }
    ex = formats.parse_preference(rec, tokenizer=tokenizer)
    theirs = trl_apply_chat_template(rec, tokenizer)
    assert (ex.prompt, ex.chosen, ex.rejected) == (
        theirs["prompt"],
        theirs["chosen"],
        theirs["rejected"],
    )


def test_conversational_errors(tokenizer):
    good = {
        "prompt": [msg("user", "q")],
        "chosen": [msg("assistant", "a")],
        "rejected": [msg("assistant", "b")],
    }
    with pytest.raises(RecordError, match="chat_template"):
        formats.parse_preference(good)
    bad = dict(good, chosen=[{"role": "assistant"}])
    with pytest.raises(RecordError) as info:
        formats.parse_preference(bad, format="conversational", tokenizer=tokenizer)
    assert info.value.field == "chosen" and info.value.reason == "bad_messages"
    same = dict(good, rejected=good["chosen"])
    with pytest.raises(RecordError, match="identical"):
        formats.parse_preference(same, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- Anthropic HH


HH_CASES = [
    # (chosen transcript, rejected transcript, expected prompt, chosen resp, rejected resp)
    (
        "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
        "\n\nHuman: What is 2+2?\n\nAssistant: 5.",
        "\n\nHuman: What is 2+2?\n\nAssistant:",
        " 4.",
        " 5.",
    ),
    (  # multi-turn: the prompt ends at the LAST "\n\nAssistant:"
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did the chicken?",
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.",
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:",
        " Why did the chicken?",
        " No.",
    ),
    (  # tricky whitespace: a response shares its first word with the other, double spaces,
        # trailing newline; the shared word stays in both responses (unlike the LCP rule)
        "\n\nHuman:  spaced   out \n\nAssistant:  I think so.\n",
        "\n\nHuman:  spaced   out \n\nAssistant:  I don't.",
        "\n\nHuman:  spaced   out \n\nAssistant:",
        "  I think so.\n",
        "  I don't.",
    ),
    (  # "Assistant:" without the blank line inside a turn is not a turn marker
        "\n\nHuman: Say 'Assistant: hi'\n\nAssistant: Assistant: hi",
        "\n\nHuman: Say 'Assistant: hi'\n\nAssistant: no",
        "\n\nHuman: Say 'Assistant: hi'\n\nAssistant:",
        " Assistant: hi",
        " no",
    ),
]


@pytest.mark.parametrize("chosen, rejected, prompt, c, r", HH_CASES)
def test_hh_transcripts_follow_paper_rule(chosen, rejected, prompt, c, r):
    rec = {"chosen": chosen, "rejected": rejected}
    assert formats.detect_format(rec) == "hh"
    assert formats.parse_preference(rec) == PreferenceExample(prompt, c, r)
    assert formats.parse_preference(rec, format="hh") == PreferenceExample(prompt, c, r)


def test_hh_errors_name_field():
    with pytest.raises(RecordError) as info:
        formats.parse_preference({"chosen": "\n\nHuman: hi", "rejected": "x"}, format="hh")
    assert info.value.reason == "not_hh_transcript" and info.value.field == "chosen"
    with pytest.raises(RecordError) as info:
        formats.parse_preference(
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"}
        )
    assert info.value.reason == "prompt_mismatch" and info.value.field == "rejected"
    with pytest.raises(RecordError) as info:  # nothing after the last Assistant turn
        formats.parse_preference(
            {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: c"}
        )
    assert info.value.reason == "empty_response" and info.value.field == "chosen"


# ----------------------------------------------------------------------------- unpaired / SFT


def test_unpaired_records():
    rec = {"prompt": "Q", "completion": " A", "label": True}
    assert formats.detect_format(rec) == "unpaired"
    assert formats.parse_unpaired(rec) == UnpairedExample("Q", " A", True)
    assert formats.parse_unpaired(dict(rec, label=0)) == UnpairedExample("Q", " A", False)
    for bad in ["yes", 2, None]:
        with pytest.raises(RecordError) as info:
            formats.parse_unpaired(dict(rec, label=bad))
        assert info.value.field == "label"
    with pytest.raises(RecordError) as info:
        formats.parse_unpaired({"prompt": "Q", "completion": "", "label": True})
    assert info.value.field == "completion"


def test_unpaired_conversational(tokenizer):
    rec = {"prompt": [msg("user", "Q?")], "completion": [msg("assistant", "A.")], "label": False}
    ex = formats.parse_unpaired(rec, tokenizer=tokenizer)
    theirs = trl_apply_chat_template(rec, tokenizer)
    assert ex == UnpairedExample(theirs["prompt"], theirs["completion"], False, templated=True)


def test_sft_records_and_chosen_side():
    assert formats.parse_sft({"prompt": "Q", "completion": " A"}) == SFTExample("Q", " A")
    hh = {"chosen": HH_CASES[1][0], "rejected": HH_CASES[1][1]}
    assert formats.parse_sft(hh) == SFTExample(HH_CASES[1][2], HH_CASES[1][3])
    std = {"prompt": "p", "chosen": " c", "rejected": " r"}
    assert formats.parse_sft(std) == SFTExample("p", " c")


# ----------------------------------------------------------------------------- errors


def test_record_error_pickles_and_counter_validates():
    import pickle

    err = RecordError("missing_field", "missing", file="a.jsonl", index=3, field="chosen")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.file, back.index, back.field) == (
        "missing_field",
        "a.jsonl",
        3,
        "chosen",
    )
    assert str(back) == str(err) == "a.jsonl, line 3, field 'chosen': missing [missing_field]"
    with pytest.raises(ValueError, match="on_bad_record"):
        BadRecordCounter("ignore")
    counter = BadRecordCounter("raise")
    with pytest.raises(RecordError):
        counter.handle(err)
