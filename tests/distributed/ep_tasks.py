"""What a distributed test runs, shared by the ranks (`worker.py`) and the one-process reference."""

import torch

ROUTING_FIELDS = ("aux_loss", "z_loss", "expert_load", "dropped_fraction")


def data_slice(batch: dict, data_parallel_size: int, data_rank: int) -> dict:
    """The rows one data-parallel rank holds (the batch split in order, as a sampler would)."""
    return {key: value.chunk(data_parallel_size)[data_rank] for key, value in batch.items()}


def labels_of(batch: dict) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def routing_fields(output) -> dict:
    return {field: getattr(output, field).detach() for field in ROUTING_FIELDS if getattr(output, field) is not None}


def forward_results(model, batch: dict, generate: int = 0) -> dict:
    """Logits, task + router loss, routing statistics and (``generate`` > 0) greedy tokens of a batch."""
    model.eval()
    with torch.no_grad():
        output = model(**batch, output_routing_stats=True)
        results = {"logits": output.logits, **routing_fields(output)}
        results["loss"] = model(**batch, labels=labels_of(batch)).loss
        if generate:
            results["generated"] = model.generate(
                **batch, max_new_tokens=generate, min_new_tokens=generate, do_sample=False
            )
    return results
