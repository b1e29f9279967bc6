"""The README's core API example: prune a tiny LLaMA gradually inside a plain PyTorch loop.

Run: python scripts/core_example.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gradprune as gp


def main() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    targets = gp.find_targets(model)  # every Linear in the blocks; embeddings and lm_head are left alone
    schedule = gp.SparsitySchedule("cubic", final_sparsity=0.7, end_step=60, every=10)
    registry = gp.MaskRegistry.of(model)
    optimizer = gp.MaskedAdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    # MaskedAdamW applies the masks inside its update; with another optimizer, attach masks the gradients
    # before every step (and re-zeroes pruned weights after it if the optimizer could move them)
    registry.attach(optimizer)

    for step in range(80):
        if schedule.is_event(step):
            target = schedule.sparsity_at(step)
            masks = gp.select_masks(targets, target, scope="global", masks=registry.current(targets))
            registry.update(targets, masks)
            achieved = gp.sparsity_report(model, targets)["global"]["sparsity"]
            print(f"step {step:3d}: target {target:.4f} achieved {achieved:.4f}")
        ids = torch.randint(0, 256, (4, 32))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    report = gp.sparsity_report(model, targets)
    print("final:", {k: round(v["sparsity"], 4) for k, v in report["by_type"].items()})


if __name__ == "__main__":
    main()
