"""The command line's help texts: the spec grammar line and each command's examples (used by ``selkv.cli``)."""

from __future__ import annotations

SPEC_HELP = (
    "cache spec; repeat to compare. Kinds: full | drop:sink=S,window=W | "
    "quant:bits=2|3|4|8 (or kbits=K,vbits=V),sink=S,window=W[,group=G][,key_axis=token|channel][,sym=0|1]"
    "[,vsym=0|1][,block=T][,rotate=hadamard-signs|hadamard|none][,vrotate=none|hadamard|hadamard-signs]"
    "[,late_kbits=K][,layer_bits=LAYERS:K/V+...] | hf-quanto:bits=2|4,residual=R | hf-hqq:bits=B,residual=R. "
    "layer_bits gives some layers other key/value widths (LAYERS i or i-j, 0-based; e.g. layer_bits=1:4/3+5-7:4/3), "
    "every other setting the spec's; late_kbits=K gives the later layers K-bit keys (default: 3 at bits=2 for every "
    "layer, 4 at bits=3 for the last 2/3, none elsewhere; with vsym=0 the last 3/4 and 2/5; late_kbits=KBITS turns "
    "it off; the later half at other widths); vsym=1 stores value groups symmetric with no zero (default at 2 and "
    "3 value bits)"
)

MAIN_EPILOG = """\
examples:
  selkv demo                                   side-by-side generation, then a short comparison
  selkv generate --prompt "Why is the sky blue?" --cache full --cache quant:bits=4,sink=4,window=124
  selkv size --tokens 32768                    KV bytes of the default cache set, no forward pass
  selkv eval perplexity --data pg19 --out results/ppl
  selkv report results/ppl
  selkv calibrate --cache quant:bits=3,vsym=0,block=64,late_kbits=3 --upgrade 4/3 --min-ratio 4 --out results/cal
  selkv lm-eval --model selkv --model_args '{"cache": "quant:bits=4,sink=4,window=124"}' --tasks lambada_openai

Run 'selkv COMMAND --help' for a command's options. SELKV_DEBUG=1 shows tracebacks for input errors.
"""

GENERATE_EPILOG = """\
examples:
  selkv generate --prompt "Explain KV caches in two sentences."
  selkv generate --prompt-file article.txt --cache full --cache quant:bits=8,sink=4,window=124
  selkv generate --model HuggingFaceTB/SmolLM2-360M-Instruct --device cuda --attn selkv \\
      --cache quant:bits=4,sink=4,window=124,key_axis=channel --prompt "..."
  selkv generate --no-chat --prompt "Once upon a time" --max-new-tokens 32
"""

SIZE_EPILOG = """\
examples:
  selkv size                                   the default cache set at 4096 tokens
  selkv size --model HuggingFaceTB/SmolLM2-1.7B-Instruct --tokens 131072 \\
      --cache full --cache quant:bits=4,sink=4,window=124
"""

DEMO_EPILOG = """\
examples:
  selkv demo
  selkv demo --device cuda --out results/demo-gpu
"""

EVAL_EPILOG = """\
examples:
  selkv eval perplexity --data pg19 --max-tokens 2048 --out results/ppl
  selkv eval needle --cache full --cache quant:bits=4,sink=4,window=124 --out results/needle
  selkv eval all --quick --out results/quick        (then: selkv report results/quick)
Rerun the same command to resume an interrupted run.
"""

REPORT_EPILOG = """\
examples:
  selkv report results/ppl                    writes results/ppl/report.md and PNG plots
  selkv report results/ppl results/needle --out docs/results --image-prefix results
"""

CALIBRATE_HELP = """\
Chooses per-layer widths (layer_bits) of a quant: spec for this model on a calibration text. The chunked
perplexity of 'full', of the --cache spec (the base) and of the base with each quantized layer upgraded alone to
--upgrade K/V (base,layer_bits=i:K/V; sliding-window layers stay 16-bit and are skipped) ranks the layers by
their gain (the base's perplexity minus theirs). The budget chooses: --layers N takes the N first-ranked layers;
--min-ratio R takes as many first-ranked layers (each lowering the perplexity) as keep the KV bytes held at
--size-tokens tokens at least R times less than a 16-bit full cache, counted as `selkv size --tokens N --chunk C`
counts them (a bfloat16 model). The chosen mix is then evaluated once.

Prints a table (each layer's perplexity, change vs full, gain, rank and bytes held; chosen layers in bold) and,
on the last line, the chosen spec. Writes DIR/calibrate.json (every run, the ranking, the choice, the settings;
rewritten after each run) and DIR/calibrate.png (each layer's perplexity change vs the base, the chosen ones
highlighted; needs matplotlib). Rerun with the same --out to resume; a new budget reuses the screen.
"""

CALIBRATE_EPILOG = """\
example (the embedded model: 33 runs, 15 minutes on 2 CPU cores):
  selkv calibrate --device cpu --dtype float32 --data pg19-morocco --max-tokens 2048 --chunk 64 \\
      --cache quant:bits=3,sink=4,window=124,vsym=0,block=64,late_kbits=3 --upgrade 4/3 \\
      --min-ratio 4.0 --out results/calibrate
  then: selkv eval perplexity --data wikitext2 --cache full --cache SPEC --out results/check
Screen on a text the evaluations do not use: layers chosen on a text score better on it than elsewhere.
"""


LM_EVAL_HELP = """\
Registers the model type 'selkv' with lm-evaluation-harness (pip install 'selkv[harness]') and runs the
harness's own command line with every argument unchanged ('selkv lm-eval --help' shows the harness's help).
Each request runs through a fresh cache; the context is fed in chunks, so a continuation reads the compressed
cache. A spec has commas, so give --model_args as JSON. Keys: pretrained (default smollm2-135m), cache
(default full), prefill_chunk (default 64; 0 = one pass, which never reads a compressed cache), dtype, attn,
max_length, max_gen_toks; the harness adds batch_size and device. Results carry the spec, the chunking and the
KV bytes held under config.selkv. When no --include_path is given, selkv's own offline tasks are included.

examples:
  selkv lm-eval --model selkv --device cpu --limit 20 --tasks lambada_openai \\
      --model_args '{"pretrained": "smollm2-135m", "cache": "quant:bits=4,sink=4,window=124", "prefill_chunk": 64}'
  selkv lm-eval --model selkv --model_args '{"cache": "full"}' --tasks selkv_needle_1k --output_path results/h
"""
