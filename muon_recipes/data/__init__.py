"""Data: corpus sources (embedded standard library, local files, hub streams), tokenizers, packing,
and the distributed resumable loader.

    tokenizer = build_tokenizer(cfg.data)
    train, eval = build_datasets(cfg.data, tokenizer, seq_len=cfg.train.seq_len, seed=cfg.seed)
    loader = DistributedLoader(train, batch_size, rank, world_size, seed=cfg.seed)
    inputs, targets = next(loader)          # LongTensor [batch_size, seq_len] each, on CPU
    state = loader.state_dict()             # plain data; loader.load_state_dict(state) resumes exactly
"""

from .loader import DistributedLoader, StreamingLoader
from .packing import TOKENS, pack_windows, token_stream, tokenize_documents
from .pipeline import build_datasets
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, check_vocab_fits

__all__ = [
    "build_tokenizer", "build_datasets", "DistributedLoader", "StreamingLoader", "Tokenizer", "ByteTokenizer",
    "HFTokenizer", "check_vocab_fits", "TOKENS", "pack_windows", "token_stream", "tokenize_documents",
]
