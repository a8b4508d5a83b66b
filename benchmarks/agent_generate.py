"""transformers' ``generate`` on the phone agent's requests: the baseline row of ``serve_load.py --agent``.

The same requests as ``serve_load.py --agent SESSIONSxSTEPS`` sends (its screens, system prompt, user
turns and history rules: imported from it), through ``Glm4vForConditionalGeneration`` loaded from a
checkpoint in the published layout (``config.json`` and safetensors shards, as
``scripts/make_layout_checkpoint.py`` writes them), in FP16 with transformers' eager attention on the GPU
(FP32 on the CPU where there is none). The prompt ids are the server's: each request goes through the
server's own ``chat_prompt`` (its request model, chat format, tokenizer and image preprocessing), with a
stand-in for the vision engine that keeps the patches the server would have fed it and gives one
placeholder row per image token; those patches (``pixel_values``, merge-window-major, and
``image_grid_thw`` ``[1, rows, cols]``) are what transformers' ``Glm4vImageProcessor`` gives, which the
run checks on its first screenshot (``processor_check``), and transformers' rotary positions over the ids
are checked equal to the server's (``positions_mismatches``).

transformers has no continuous batching for this model (rows join and leave only between ``generate``
calls), so the load runs in rounds: round ``k`` holds every live session's step ``k`` (each built from that
session's step ``k - 1`` reply, as the client would send it), as one left-padded batch through one
``generate`` call (``--max-batch`` rows at most: a larger round is several calls, one after another; where
a call runs out of GPU memory the whole load is replayed at half the rows, and the row says so).
Every request of a round is taken as sent at the round's start (the previous round's end), so a step's
TTFT is from there to its first token (a streamer timestamps the first new token, after the prefill),
preprocessing and waiting for earlier calls of the round included. Greedy, exactly ``--agent-tokens``
new tokens per step (EOS suppressed for them, as the server ignores it), each step's reply decoded as the
server streams it (special tokens shown) and fed into the session's next step. No prefix reuse: every
prompt token runs through the decoder. A warm-up call (the first screenshot without the system prompt, two
tokens) comes first, untimed.

Writes one JSON row (``--json PATH``) and prints it; ``serve_load.py --agent ... --baseline PATH`` shows it
as the third line of its table. Runs on the Python with torch and transformers (not the TensorRT one).

    python benchmarks/agent_generate.py --checkpoint /data/ckpt-9b -c configs/autoglm-phone-9b.yaml \\
        --agent 8x5 --agent-tokens 32 --json generate.json
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint; nothing from a hub

from serve_load import (  # noqa: E402
    agent_body,
    agent_reply,
    agent_screens,
    agent_system_prompt,
    agent_turn,
)

IMAGE_TOKENS = {"image_token_id": "<|image|>", "image_start_token_id": "<|begin_of_image|>",
                "image_end_token_id": "<|end_of_image|>"}


class VisionStandIn:
    """The server's vision backend as ``chat_prompt`` sees it (``files``, ``parts``, ``vision_patches``, ``encode``):
    keeps the packed patches the server would have fed its vision engine (``images``, in request order)
    and answers with one placeholder row per image token, so the server's own code builds the prompt."""

    name = "transformers"

    def __init__(self, merge: int) -> None:
        self.merge = merge
        self.files = {"vision": "transformers"}
        self.parts = {"vision": ["vision"]}  # the modules loaded, as Backend.parts has them
        self.vision_patches: Optional[int] = None  # the config's patch bound, as the engine's profile has it
        self.images: List[Dict[str, np.ndarray]] = []

    def encode(self, module: str, feed: Dict[str, np.ndarray], output: str) -> np.ndarray:
        self.images.append(feed)
        return np.zeros((len(feed["pixel_values"]) // self.merge ** 2, 1), np.float32)


class Request:
    """One step of one session: the server's prompt (ids and positions) and its images' patches."""

    def __init__(self, session: int, step: int, prompt: Any, images: List[Dict[str, np.ndarray]]) -> None:
        self.session, self.step, self.prompt, self.images = session, step, prompt, images

    @property
    def grids(self) -> List[List[int]]:
        """``image_grid_thw`` rows: ``[1, patch rows, patch cols]`` per image (a still image is one frame)."""
        return [[1, int(img["patch_grid"][0, 1]), int(img["patch_grid"][0, 2])] for img in self.images]


def server_state(cfg, tokenizer) -> Any:
    """What the server's ``chat_prompt`` reads of its state: the config, the tokenizer, the vision stand-in."""
    from autoglm_build.serve.app import ServerState

    return ServerState(cfg=cfg, backend=VisionStandIn(cfg.vision.spatial_merge_size), tokenizer=tokenizer,
                       scheduler=None)


def server_request(state, session: int, step: int, messages: list, tokens: int) -> Request:
    """The request ``serve_load.py`` sends (:func:`agent_body`) as the server parses and tokenizes it."""
    from autoglm_build.serve.app import chat_prompt
    from autoglm_build.serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(agent_body(messages, tokens))
    state.backend.images = []
    prompt = chat_prompt(state, body)
    return Request(session, step, prompt, state.backend.images)


# ---- the model ---------------------------------------------------------------------------------


def load_model(checkpoint: Path, tokenizer, device: str) -> Tuple[Any, Any]:
    """(model, dtype): ``Glm4vForConditionalGeneration`` from the checkpoint's safetensors, FP16 eager on the
    GPU, FP32 on the CPU. The image token ids are the server's tokenizer's (the layout's ``config.json``
    carries GLM's ids, which a smaller vocabulary does not hold)."""
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    config = Glm4vConfig.from_pretrained(checkpoint, local_files_only=True)
    for field, token in IMAGE_TOKENS.items():
        setattr(config, field, tokenizer.ids[token])
    model = Glm4vForConditionalGeneration.from_pretrained(
        checkpoint, config=config, dtype=dtype, attn_implementation="eager", local_files_only=True,
        use_safetensors=True)
    return model.to(device).eval(), dtype


class FirstToken:
    """A ``generate`` streamer that notes when the first new tokens reach the host (its second ``put``:
    the first is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def batch_inputs(requests: List[Request], model, pad: int, dtype) -> Dict[str, Any]:
    """The requests as one left-padded batch: ids, mask, ``mm_token_type_ids`` (1 on image tokens), every
    image's patches in row order and their grids."""
    import torch

    width = max(len(r.prompt.ids) for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for k, r in enumerate(requests):
        ids[k, width - len(r.prompt.ids):] = torch.tensor(r.prompt.ids)
        mask[k, width - len(r.prompt.ids):] = 1
    images = [img for r in requests for img in r.images]
    out = {"input_ids": ids, "attention_mask": mask,
           "mm_token_type_ids": (ids == model.config.image_token_id).to(torch.int32) * mask.to(torch.int32)}
    if images:
        out["pixel_values"] = torch.from_numpy(np.concatenate([img["pixel_values"] for img in images])).to(dtype)
        out["image_grid_thw"] = torch.tensor([g for r in requests for g in r.grids], dtype=torch.long)
    return {k: v.to(model.device) for k, v in out.items()}


def generate(model, requests: List[Request], tokens: int, tokenizer, dtype) -> Tuple[List[List[int]], float]:
    """One greedy ``generate`` call over the requests: (each row's new ids, when the first new tokens came).
    As on the server, only ids the tokenizer can write are picked (the sampler's candidates)."""
    import torch
    from transformers import GenerationConfig

    from autoglm_build.runtime.generation import Sampler

    pad = tokenizer.ids["<|endoftext|>"]
    inputs = batch_inputs(requests, model, pad, dtype)
    never = np.setdiff1d(np.arange(model.config.text_config.vocab_size), Sampler(tokenizer, 1).ids)
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=sorted(tokenizer.stop_ids), use_cache=True,
                              suppress_tokens=never.tolist() or None)
    streamer = FirstToken()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config, streamer=streamer)
    new = out[:, inputs["input_ids"].shape[1]:].cpu().tolist()
    return new, streamer.at if streamer.at is not None else time.perf_counter()


def reply_text(tokenizer, ids: List[int]) -> str:
    """The reply as the server streams it for these requests (thinking off, special tokens shown)."""
    from autoglm_build.runtime.text import Detokenizer

    detok = Detokenizer(tokenizer, skip_special_tokens=False)
    return "".join(detok.push(t) for t in ids)


# ---- the load ----------------------------------------------------------------------------------


def replay(model, dtype, state, screens: list, tokens: int, max_batch: int) -> Dict[str, Any]:
    """Every session's steps in rounds (module docstring); per step its TTFT from the round's start."""
    sessions = [[{"role": "system", "content": agent_system_prompt()}] for _ in screens]
    alive, steps, done, failed = list(range(len(screens))), [], [], []
    start = time.perf_counter()
    for k in range(len(screens[0]) if screens else 0):
        sent = time.perf_counter()
        calls = []
        for s in alive:
            sessions[s].append(agent_turn(k, screens[s][k]))
        for at in range(0, len(alive), max_batch):
            requests = [server_request(state, s, k, sessions[s], tokens) for s in alive[at:at + max_batch]]
            try:
                new, first = generate(model, requests, tokens, state.tokenizer, dtype)
            except Exception as exc:  # noqa: BLE001 - these sessions end, as on the server
                if out_of_memory(exc) and max_batch > 1:
                    raise  # main replays the whole load in smaller calls
                failed += [(r.session, exc) for r in requests]
                continue
            for r, ids in zip(requests, new):
                content = reply_text(state.tokenizer, ids)
                calls.append({"session": r.session, "step": k, "ttft": first - sent,
                              "prompt_tokens": len(r.prompt.ids), "tokens": len(ids), "content": content,
                              "padded": max(len(q.prompt.ids) for q in requests)})
                agent_reply(sessions[r.session], content)
                done.append(r)
        steps += calls
        alive = [s for s in alive if s not in {f[0] for f in failed}]
    wall = time.perf_counter() - start
    return {"steps": steps, "failed": failed, "wall": wall, "requests": done}


def out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


def replay_fitting(model, dtype, state, screens: list, tokens: int, max_batch: int) -> Tuple[Dict[str, Any], int]:
    """:func:`replay` with ``max_batch`` rows per call, or, where a call runs out of GPU memory (eager attention
    holds a ``rows x heads x prompt x prompt`` FP32 softmax), the whole load again at half of it:
    (the run, the rows per call it ran with)."""
    import torch

    while True:
        try:
            return replay(model, dtype, state, screens, tokens, max_batch), max_batch
        except Exception as exc:  # noqa: BLE001 - only out of memory is retried
            if not out_of_memory(exc):
                raise
        # here, where the exception and the tensors its frames held are gone
        print(f"agent_generate: out of GPU memory at {max_batch} rows per call; replaying at {max_batch // 2}",
              file=sys.stderr)
        max_batch //= 2
        gc.collect()
        torch.cuda.empty_cache()


def positions_mismatches(model, requests: List[Request]) -> int:
    """Requests whose prompt positions (the server's, ``ChatTokenizer.build``) differ from transformers'
    ``get_rope_index`` over the same ids and grids."""
    import torch

    bad = 0
    for r in requests:
        ids = torch.tensor([r.prompt.ids])
        kinds = (ids == model.config.image_token_id).to(torch.int32)
        grids = torch.tensor(r.grids, dtype=torch.long) if r.images else None
        positions, _ = model.model.get_rope_index(ids, kinds, grids)
        bad += int(not np.array_equal(positions[:, 0].numpy(), r.prompt.positions))
    return bad


def processor_check(screen_url: str, request: Request, geometry) -> Dict[str, Any]:
    """The first screenshot's patches against transformers' own ``Glm4vImageProcessor`` (its PIL path, the
    server's resize) at the server's pixel bounds: equal grids, the largest difference."""
    from PIL import Image
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    image = Image.open(io.BytesIO(base64.b64decode(screen_url.split(",", 1)[1]))).convert("RGB")
    ref = Glm4vImageProcessorPil()(image, size={"shortest_edge": geometry.min_pixels,
                                                "longest_edge": geometry.max_pixels}, return_tensors="np")
    ours = request.images[0]["pixel_values"]
    same_shape = ref["pixel_values"].shape == ours.shape
    return {"grid": request.grids[0], "transformers_grid": ref["image_grid_thw"][0].tolist(),
            "max_abs_diff": float(np.abs(ref["pixel_values"] - ours).max()) if same_shape else float("inf")}


def summary(run: Dict[str, Any], sessions: int, steps: int, tokens: int) -> Dict[str, Any]:
    """The row in ``serve_load.agent_phase``'s keys (the baseline prefills every prompt token, reuses none)."""
    done = run["steps"]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    ttft = [r["ttft"] for r in done]
    later = [r["ttft"] for r in done if r["step"] > 0]
    prompt = sum(r["prompt_tokens"] for r in done)
    contents: List[Optional[List[str]]] = [[] for _ in range(sessions)]
    for r in done:
        contents[r["session"]].append(r["content"])
    failed = {s for s, _ in run["failed"]}
    return {"sessions": sessions, "steps_per_session": steps, "agent_tokens": tokens, "steps": len(done),
            "errors": len(failed), "first_error": repr(run["failed"][0][1]) if failed else "",
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "later_p50": pct(later, 50),
            "later_p99": pct(later, 99), "prompt_tokens": prompt, "prefilled": prompt, "reused": 0,
            "tokens_per_s": sum(r["tokens"] for r in done) / run["wall"], "wall_s": run["wall"],
            "contents": [c if s not in failed else None for s, c in enumerate(contents)],
            "per_step": [{k: r[k] for k in ("session", "step", "ttft", "prompt_tokens", "tokens", "padded")}
                         for r in done]}


def label(rows: int, device: str, dtype) -> str:
    import torch
    import transformers

    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    return (f"transformers {transformers.__version__} generate, torch {torch.__version__} "
            f"{str(dtype).replace('torch.', '')} eager on {where}; rounds of each session's next step, "
            f"left-padded, {rows} rows per call, greedy, no prefix reuse")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (published layout)")
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "autoglm-phone-tiny.yaml"),
                        help="the served build's config: its tokenizer and image bounds")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the config's, else the checkpoint's)")
    parser.add_argument("--agent", default="8x5", help="SESSIONSxSTEPS, as serve_load.py --agent")
    parser.add_argument("--agent-tokens", type=int, default=32, help="new tokens per step")
    parser.add_argument("--max-batch", type=int, default=8, help="rows per generate call")
    parser.add_argument("--device", help="torch device (default: cuda where there is one, else cpu)")
    parser.add_argument("--json", type=Path, help="write the row here")
    args = parser.parse_args(argv)

    import torch

    from autoglm_build.calibration import load_tokenizer, tokenizer_for
    from autoglm_build.config import load_config
    from autoglm_build.runtime.media import image_geometry
    from autoglm_build.runtime.text import ChatTokenizer

    cfg = load_config(Path(args.config))
    if args.tokenizer is None and not cfg.tokenizer and not cfg.checkpoint:
        cfg = cfg.model_copy(update={"checkpoint": str(args.checkpoint)})  # its tokenizer.json, as serve reads it
    raw = load_tokenizer(args.tokenizer) if args.tokenizer else tokenizer_for(cfg)[0]
    tokenizer = ChatTokenizer(raw, cfg.text.vocab_size)
    sessions, steps = (int(x) for x in args.agent.lower().split("x"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, dtype = load_model(args.checkpoint, tokenizer, device)
    state = server_state(cfg, tokenizer)
    screens = agent_screens(sessions, steps)
    print(f"agent_generate: {sessions}x{steps}, {args.agent_tokens} tokens per step, {device} {dtype}",
          file=sys.stderr)

    first = server_request(state, 0, 0, [agent_turn(0, screens[0][0])], 2)  # a short warm-up, screenshot and all
    generate(model, [first], 2, tokenizer, dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()

    run, rows = replay_fitting(model, dtype, state, screens, args.agent_tokens, args.max_batch)
    row = summary(run, sessions, steps, args.agent_tokens)
    row.update(label=label(rows, device, dtype), device=device, dtype=str(dtype).replace("torch.", ""),
               max_batch=rows, positions_mismatches=positions_mismatches(model, run["requests"]),
               processor_check=processor_check(screens[0][0], first, image_geometry(cfg)))
    text = json.dumps(row, ensure_ascii=False)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, args.json)
    print(text)
    return 1 if row["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
