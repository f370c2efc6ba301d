"""The tiny model maker: a loadable Qwen2 checkpoint with a char-level tokenizer, built offline."""

import os

import pytest

from rollout.tiny_model import build_char_tokenizer, eos_token_ids, make_tiny_model

TEXT = "Let x = 3.\n```python\nprint(x ** 2)\n```\n```output\n9\n```\nSo \\boxed{9}<|im_end|>"


@pytest.mark.parametrize("alphabet", ["full", "digits"])
def test_one_token_per_character_and_exact_decode(alphabet):
    tok = build_char_tokenizer(alphabet)
    text = TEXT if alphabet == "full" else "c:381=\n12+3, ar"
    ids = tok.encode(text, add_special_tokens=False)
    n_special = text.count("<|im_end|>")
    assert len(ids) == len(text) - n_special * (len("<|im_end|>") - 1)
    assert tok.decode(ids) == text
    assert len(tok) == (99 if alphabet == "full" else 24)


def test_saved_checkpoint_loads_with_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = make_tiny_model(str(tmp_path / "m"), hidden_size=32, num_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64)
    tok = AutoTokenizer.from_pretrained(out)  # transformers may pick Qwen2's own tokenizer class
    ref = build_char_tokenizer("full")
    assert tok.encode(TEXT, add_special_tokens=False) == ref.encode(TEXT, add_special_tokens=False)
    assert tok.decode(tok.encode(TEXT, add_special_tokens=False)) == TEXT
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "qwen2" and cfg.vocab_size == len(tok) and cfg.num_hidden_layers == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert eos_token_ids(tok) == [0, 2]
    assert any(f.endswith(".safetensors") for f in os.listdir(out))


def test_cli(tmp_path, capsys):
    """The tool's main() with a command line, in this process (transformers is loaded here already; a
    subprocess would spend ~5 s of CPU importing it again)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "tools", "make_tiny_model.py")
    spec = importlib.util.spec_from_file_location("make_tiny_model_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(tmp_path / "c"), "--alphabet", "digits", "--layers", "1"])
    out = capsys.readouterr().out
    assert "1 layers" in out and "vocab 24" in out, out
    with pytest.raises(SystemExit) as e:  # argparse's refusal, as on the command line
        tool.main([str(tmp_path / "d"), "--layers", "two"])
    assert e.value.code == 2 and "--layers" in capsys.readouterr().err
