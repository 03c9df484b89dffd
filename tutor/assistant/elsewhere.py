"""Fields where the lessons' own words mean something else: a question closer to one of them
than to any lesson passage is about that field, and the tutor declines it.

A similarity threshold alone cannot tell "What bit depth should I record at?" from "What bit
width should I quantize to?": both sit close to a lesson sentence about bits. Set against a
short description of audio recording, the first is closer to that, the second to the lesson.
The list was written by going through the words the lessons lean on (bits, quantization,
precision, memory, model, GPU, speed, calibration, and the names llama, Hermes, perplexity)
and naming the fields where each means something else, plus the parts of machine learning,
serving and tooling the lessons leave out. It is not a list of questions: each line names a
field in the words its own questions use.
"""

from __future__ import annotations

import numpy as np

ELSEWHERE: tuple[str, ...] = (
    # bits, bit depth
    "bit depth and sample rate for recording music and audio files",
    "dynamic range and noise floor of 16-bit and 24-bit audio, dithering",
    "colour depth of images, monitors and displays, 8-bit and 10-bit colour",
    "retro 8-bit and 16-bit video game consoles and pixel art",
    "32-bit and 64-bit processors, operating systems and programs",
    "encryption key length, 128-bit and 256-bit ciphers and passwords",
    # quantization
    "quantization noise in analog-to-digital converters and signal processing",
    "quantizing MIDI notes to the beat in music production software",
    "JPEG image compression and quantization tables",
    "k-means clustering and vector quantization of data points",
    "quantum physics: quantized energy levels, photons and electrons",
    # precision
    "precision and recall of a classifier, accuracy metrics in statistics",
    "precision of measuring instruments, tolerances in engineering and manufacturing",
    "floating-point rounding errors in everyday programming, 0.1 + 0.2 in Python or JavaScript",
    "NaN, infinity and special values in IEEE 754 floating-point arithmetic",
    # memory, storage, compression
    "computer RAM modules, DDR memory speed, motherboards and upgrades",
    "hard drives, SSD storage capacity and file systems",
    "zip files and compressing documents, photos and backups",
    "video streaming quality, bitrate, resolution and codecs such as H.264",
    "human memory, studying and remembering things",
    "memory leaks and garbage collection in software",
    # models, GPUs, speed
    "buying a graphics card or gaming PC, gaming frame rates",
    "mining cryptocurrency with GPUs, crypto tokens and blockchains",
    "internet speed, network bandwidth, megabits per second and Wi-Fi",
    "3D models, CAD and 3D printing",
    "statistical and economic models, regression and forecasting",
    "fashion models, model trains and scale models",
    # the parts of machine learning, serving and tooling the lessons leave out
    "training neural networks: learning rates, optimizers, loss functions and datasets",
    "how many epochs and what batch size to train or fine-tune a model with",
    "fine-tuning, RLHF and instruction tuning of language models",
    "prompt engineering and writing prompts for chatbots",
    "computer vision, image classification and object detection",
    "speculative decoding with a draft model, beam search and other decoding strategies",
    "how tokenizers split words into tokens, special tokens and vocabularies",
    "how attention works inside a transformer: heads, grouped-query attention, flash attention",
    "mixture-of-experts models and routing tokens to experts",
    "pruning, sparsity and knowledge distillation to make models smaller",
    "serving engines such as vLLM, TGI and TensorRT-LLM: batching, paged KV cache, throughput",
    "sampling settings: top-k, top-p, repetition penalty",
    "exporting and converting models: ONNX, TensorRT, conversion scripts",
    "benchmark scores of particular models: MMLU, HumanEval, leaderboards",
    "model licences and commercial use",
    "installing GPU drivers, CUDA, ROCm and AI apps",
    "prices and specifications of particular GPUs, Macs and cloud instances",
    "LoRA, QLoRA and full fine-tuning recipes: ranks, learning rates, optimizer memory",
    # names the lessons use
    "llamas and alpacas, the animals",
    "Greek mythology, Hermes the messenger god",
    "Perplexity, the AI search engine company",
    "calibrating a monitor, a camera or a scale",
)

# A question belongs to a field elsewhere when that field's line is at least this much closer
# to it (cosine) than the closest lesson passage. Tuned on content/eval_questions.yaml: from 0.04
# to 0.06 the same questions are declined (88 of its 106 off-topic ones), at 0.03 one more
# on-lesson one too.
ELSEWHERE_MARGIN = 0.05


def field_of(query_vector: np.ndarray, fields: np.ndarray, best_cosine: float) -> str:
    """The field elsewhere the question is about ("" when a lesson passage is about as close as
    any); ``fields`` holds ELSEWHERE's vectors, ``best_cosine`` the closest passage's cosine."""
    if not len(fields):
        return ""
    cosines = fields @ query_vector
    best = int(np.argmax(cosines))
    return ELSEWHERE[best] if float(cosines[best]) - best_cosine >= ELSEWHERE_MARGIN else ""
