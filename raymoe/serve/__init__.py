"""Serving a checkpoint over HTTP with Ray Serve: an OpenAI-style completions API whose
replicas are expert-parallel inference groups (raymoe.infer.group).

  app.py           serve_checkpoint, ServeOptions, stop_serving: the application on a cluster
  ingress.py       the HTTP deployment: requests in, completions and streams out
  replica.py       the model's deployment: one inference group, rows batched
  batching.py      which rows form a batch, and which of them share a generate call
  protocol.py      the completion request, checked field by field (HTTP 400)
  responses.py     OpenAI's response shapes and server-sent events
  text.py          tokens to text: end of text, stop strings, what a stream may send
  served_model.py  the model's id, context and tokenizer
"""

from raymoe.serve.app import Served, ServeOptions, serve_checkpoint, stop_serving

__all__ = ["Served", "ServeOptions", "serve_checkpoint", "stop_serving"]
