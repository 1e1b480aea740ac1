"""Our AR checkpoint is a real Llama checkpoint: transformers loads it and gives our logits."""

import pytest
import torch

from helios.ar_runtime import ARRuntime
from helios.checkpoint import load_component
from helios.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported_llama(tiny_checkpoint, tmp_path_factory):
    from helios.export.hf_llama import export_llama

    return export_llama(tiny_checkpoint, tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("component", ["ar_backbone", "draft"])
def test_llama_for_causal_lm_matches_our_logits(tiny_checkpoint, exported_llama, component):
    """transformers loads the exported checkpoint (helios/export/hf_llama.py) and gives our logits."""
    ours = load_component(tiny_checkpoint, component)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(exported_llama[component]), dtype=torch.float32).eval()
    assert hf.generation_config.bos_token_id == ours.config.bos_token_id
    cfg = ours.config
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(6, cfg.hidden_size, generator=gen)
    tokens = [cfg.bos_token_id] + torch.randint(0, cfg.plan_vocab_size, (10,), generator=gen).tolist()

    # transformers: the whole sequence at once, prefix rows as inputs_embeds.
    embeds = torch.cat([prefix, hf.model.embed_tokens(torch.tensor(tokens))])[None]
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds).logits[0]

    # ours: prefill the prefix and 3 tokens, then decode the rest one by one from the cache.
    rt = ARRuntime(ours, num_blocks=16, block_size=4)
    rt.add_sequence(0, prefix, tokens[:4], SamplingParams())
    got = [rt.logits(0)]
    for t in tokens[4:]:
        rt.seqs[0].tokens.append(t)  # teacher forcing: the next known token
        got.append(rt.logits(0))
    torch.testing.assert_close(torch.stack(got), ref[len(prefix) + 3:], rtol=1e-4, atol=1e-4)
