"""LLaVA conversations as training tokens, with SmolLM2's real tokenizer and ChatML template: labels sit
exactly on each answer and its ``<|im_end|>\\n``, the image becomes N masked slots, and every conversation
that cannot be labelled is refused with its reason."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from models.llava_text import (
    IGNORE_INDEX,
    Encoded,
    EncodeError,
    chat_templates,
    collate,
    encode_conversation,
    prepare_tokenizer,
)

N = 5
START, END = "<|im_start|>", "<|im_end|>"
TURNS = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A black cat sleeping on a red sofa."},
    {"from": "human", "value": "What colour is the sofa?"},
    {"from": "gpt", "value": "Red, with a\nwhite cushion."},
]
REVERSED = "{% for m in messages | reverse %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
COUNTED = "{% for m in messages %}{{ m['content'] + '\n' }}{% endfor %}{{ '(' ~ messages | length ~ ' turns)' }}"
CONCATENATED = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def base():
    from models.causal_lm import load_tokenizer

    return load_tokenizer("packaged:smollm2-135m")


def prepared(base, template=None):
    tokenizer = copy.deepcopy(base)
    return tokenizer, prepare_tokenizer(tokenizer, template)


@pytest.fixture(scope="module")
def own(base):
    return prepared(base)


def encode(tokenizer, image_id, turns, max_length=1024):
    return encode_conversation(tokenizer, turns, image_token_id=image_id, image_tokens=N, max_length=max_length)


def supervised_runs(tokenizer, encoded: Encoded) -> list[str]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    runs += [current] if current else []
    return [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in runs]


def test_two_exchanges_supervise_each_answer_and_its_end_of_turn_token_by_token(own):
    tokenizer, image_id = own
    encoded = encode(tokenizer, image_id, TURNS)
    # The expected sequence, piece by piece from ChatML's format (pieces meet at special tokens, so
    # tokenizing them apart gives the same ids); only the SmolLM2 default system block is read off the render.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    system = text[: text.index(f"{START}user\n")]
    assert system.startswith(f"{START}system\n") and system.endswith(f"{END}\n")
    pieces = [(system, False)]
    for user, answer in zip(TURNS[::2], TURNS[1::2], strict=True):
        pieces += [
            (f"{START}user\n{user['value']}{END}\n{START}assistant\n", False),
            (f"{answer['value']}{END}\n", True),
        ]
    ids, labels = [], []
    for piece, supervised in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids)
    slot = ids.index(image_id)
    assert encoded.image_start == slot
    assert encoded.input_ids == ids[:slot] + [image_id] * N + ids[slot + 1 :]
    assert encoded.labels == labels[:slot] + [IGNORE_INDEX] * N + labels[slot + 1 :]
    assert supervised_runs(tokenizer, encoded) == [f"{t['value']}{END}\n" for t in TURNS[1::2]]


def test_the_image_becomes_n_masked_slots_at_image_start(own):
    tokenizer, image_id = own
    encoded = encode(tokenizer, image_id, TURNS)
    start = encoded.image_start
    assert encoded.input_ids[start : start + N] == [image_id] * N and encoded.input_ids.count(image_id) == N
    assert encoded.labels[start : start + N] == [IGNORE_INDEX] * N
    assert tokenizer.decode(encoded.input_ids[:start]).endswith(f"{START}user\n")


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([TURNS[1], TURNS[0]], "roles_out_of_order"),
        (TURNS[:3], "roles_out_of_order"),
        ([{"from": "human", "value": "no image here"}, TURNS[1]], "image_token_misplaced"),
        ([{"from": "human", "value": "<image><image> twice"}, TURNS[1]], "image_token_misplaced"),
        ([TURNS[0], {"from": "gpt", "value": "<image>"}], "image_token_misplaced"),
        ([TURNS[0], {"from": "gpt", "value": " \n"}], "empty_turn"),
        ([], "empty_conversation"),
    ],
)
def test_invalid_conversations_are_refused_with_conversation_problems_reason(own, turns, reason):
    with pytest.raises(EncodeError) as caught:
        encode(*own, turns)
    assert caught.value.reason == reason


def test_a_sequence_longer_than_max_length_is_refused_not_truncated(own):
    length = len(encode(*own, TURNS).input_ids)
    assert len(encode(*own, TURNS, max_length=length).input_ids) == length
    with pytest.raises(EncodeError, match=f"{length} tokens") as caught:
        encode(*own, TURNS, max_length=length - 1)
    assert caught.value.reason == "sequence_too_long"


@pytest.mark.parametrize(
    ("template", "turns", "reason"),
    [
        (REVERSED, TURNS, "template_not_prefix"),
        (COUNTED, TURNS, "template_not_prefix"),
        (
            "{% for m in messages %}{{ m['content'] + m['content'] if m['role'] == 'user' else m['content'] }}{% endfor %}",
            TURNS,
            "image_token_count",
        ),
        (
            "{% for m in messages %}{{ m['content'] if m['role'] == 'user' else 'OK\n' }}{% endfor %}",
            TURNS,
            "template_drops_answer",
        ),
        (
            CONCATENATED,
            [{"from": "human", "value": "<image>\nhello Q"}, {"from": "gpt", "value": "uestion time"}],
            "label_boundary_inside_token",
        ),  # " Question" is one token, across the boundary
        ("{{ raise_exception('no') }}", TURNS, "template_error"),
    ],
)
def test_templates_that_cannot_be_labelled_are_refused(base, template, turns, reason):
    tokenizer, image_id = prepared(base)
    tokenizer.chat_template = template
    with pytest.raises(EncodeError) as caught:
        encode(tokenizer, image_id, turns)
    assert caught.value.reason == reason, str(caught.value)


def test_an_answer_with_no_tokens_of_its_own_is_refused(base):
    from tokenizers import normalizers

    tokenizer, image_id = prepared(base)
    tokenizer.chat_template = CONCATENATED
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")  # the answer normalizes to nothing
    with pytest.raises(EncodeError) as caught:
        encode(tokenizer, image_id, [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "~~~"}])
    assert caught.value.reason == "no_supervised_tokens"


def test_without_prepare_tokenizer_the_image_token_is_missing(base):
    tokenizer = copy.deepcopy(base)
    with pytest.raises(EncodeError) as caught:
        encode(tokenizer, len(tokenizer), TURNS)
    assert caught.value.reason == "image_token_count"


def test_plain_template_supervises_exactly_the_caption_and_eos(base):
    tokenizer, image_id = prepared(base, "plain")
    caption = "A brown dog runs along a sandy beach."
    encoded = encode(
        tokenizer,
        image_id,
        [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption}],
    )
    caption_ids = tokenizer(caption + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert encoded.image_start == 0
    assert encoded.input_ids == [image_id] * N + caption_ids
    assert encoded.labels == [IGNORE_INDEX] * N + caption_ids
    assert caption_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(EncodeError) as caught:
        encode(tokenizer, image_id, TURNS)
    assert caught.value.reason == "template_error"


def test_prepare_tokenizer_is_idempotent_and_restores_the_own_template(base):
    tokenizer = copy.deepcopy(base)
    own_template, size = tokenizer.chat_template, len(tokenizer)
    image_id = prepare_tokenizer(tokenizer, "chatml")
    assert len(tokenizer) == size + 1 and image_id == size  # the caller resizes the embeddings to len(tokenizer)
    assert tokenizer.chat_template == chat_templates()["chatml"].read_text()
    assert prepare_tokenizer(tokenizer, "plain") == image_id and len(tokenizer) == size + 1
    assert prepare_tokenizer(tokenizer) == image_id and tokenizer.chat_template == own_template
    assert tokenizer("a <image> b", add_special_tokens=False)["input_ids"].count(image_id) == 1


def test_chatml_template_has_no_default_system_prompt(base):
    tokenizer, image_id = prepared(base, "chatml")
    encoded = encode(tokenizer, image_id, TURNS[:2])
    assert tokenizer.decode(encoded.input_ids[: encoded.image_start]) == f"{START}user\n"
    assert supervised_runs(tokenizer, encoded) == [f"{TURNS[1]['value']}{END}\n"]


def test_prepare_tokenizer_errors_and_pad_token(base):
    tokenizer = copy.deepcopy(base)
    tokenizer.chat_template, tokenizer.pad_token = None, None
    with pytest.raises(ValueError, match="no chat template.*chatml.*plain"):
        prepare_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        prepare_tokenizer(tokenizer, "vicuna")
    prepare_tokenizer(tokenizer, "chatml")
    assert tokenizer.pad_token == tokenizer.eos_token


def test_collate_pads_on_the_right():
    short = Encoded(input_ids=[7, 8, 9], labels=[IGNORE_INDEX, 8, 9], image_start=0)
    long = Encoded(input_ids=[1, 2, 3, 4, 5], labels=[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], image_start=1)
    batch = collate([short, long], pad_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 8, 9, -100, -100], [-100, -100, 3, 4, 5]]
    assert all(t.dtype == torch.long for t in batch.values())


ALPHABET = (
    list("abcxyz ABC  .,;:!?'\"-_/\\()[]{}0123456789\n\t")
    + list("éüßçñ中文字日本語Ωλ🙂👍🏽")
    + [
        f"{START}assistant\n",
        END,
        "\nuser\n",
        "assistant",
        "### Assistant:",
        "USER:",
        "<image",
        "image>",
        "<|im_",
        "\n\n",
    ]
)


def _text(rng: random.Random) -> str:
    words = [rng.choice(ALPHABET) for _ in range(rng.randint(1, 30))]
    return "".join(words) + rng.choice("abc中🙂")  # never blank


def test_property_supervised_text_is_exactly_the_assistant_spans(own):
    tokenizer, image_id = own
    rng = random.Random(1234)
    encoded_count = 0
    for _ in range(50):
        turns = []
        for k in range(rng.randint(1, 3)):
            question = _text(rng)
            if k == 0:
                cut = rng.randint(0, len(question))
                question = question[:cut] + "<image>" + question[cut:]
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": _text(rng)}]
        try:
            encoded = encode(tokenizer, image_id, turns, max_length=4096)
        except EncodeError as e:
            # ChatML's one straddling case: an answer's leading whitespace merged with the header's newline.
            assert e.reason == "label_boundary_inside_token", e
            assert any(t["value"][0].isspace() for t in turns[1::2]), turns
            continue
        encoded_count += 1
        assert supervised_runs(tokenizer, encoded) == [f"{t['value']}{END}\n" for t in turns[1::2]], turns
        assert encoded.input_ids[encoded.image_start : encoded.image_start + N] == [image_id] * N
        collapsed = encoded.input_ids[: encoded.image_start + 1] + encoded.input_ids[encoded.image_start + N :]
        assert tokenizer.decode(collapsed, clean_up_tokenization_spaces=False) == tokenizer.apply_chat_template(
            [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns],
            tokenize=False,
        )
    assert encoded_count >= 35


def test_an_answer_starting_with_blank_lines_is_refused_in_chatml(own):
    tokenizer, image_id = own
    with pytest.raises(EncodeError) as caught:
        encode(tokenizer, image_id, [TURNS[0], {"from": "gpt", "value": "\n\nA cat."}])
    assert caught.value.reason == "label_boundary_inside_token"
