"""Seeds for vLLM requests: one per prompt of a batch, spread from the batch's seed."""

from __future__ import annotations

import hashlib


def request_seeds(seed: int | None, num_prompts: int) -> list[int | None]:
    """One vLLM seed per prompt of a batch, derived from the batch's `seed` and the prompt's index.

    vLLM's seeded sampler draws its noise from the request's own seed, so one seed for every request
    of a batch gives every prompt the same noise: on a model with flat next-token distributions all
    prompts then get the same completions (vLLM gives the `n` samples of one request seeds
    ``seed + j``, so those differed, but prompt i's sample j equalled prompt k's sample j). A hash of
    (seed, index) keeps the requests' seeds -- and their children's ``+ j`` -- apart, also from the
    next batch's (a plain ``seed + i * n`` would reuse step s's seeds at step s + 1 shifted by one).
    """
    if seed is None:
        return [None] * num_prompts
    return [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") >> 2
            for i in range(num_prompts)]  # < 2**62: room for vLLM's `+ j` inside torch's seed range
