"""Archive search: the application that indexes an image archive with an adapted CLIP-style model
and searches it by text, by image or by an indexed item, from a command line, Python, an HTTP
JSON API or a web page.

The core (`harma`) never imports this package. What is here:

- `harma.search.sources`: what is indexed (a folder tree, a caption dataset of any format,
  webdataset shards);
- `harma.search.indexer`: `build_index`, resumable and torchrun-aware;
- `harma.search.store`: the index files and exact search over memory-mapped float16 shards;
- `harma.search.ann`: an approximate FAISS index with its measured recall (optional extra);
- `harma.search.manifest`: what an index was built with, and the check at query time;
- `harma.search.encoder`: `SearchModel`, one backbone embedding queries for several indexes;
- `harma.search.archive`: `SearchIndex` and `Searcher`, the query side;
- `harma.search.server`: the FastAPI application and the page (optional extra ``harma[search]``);
- `harma.search.cli`: ``python -m harma.search index | query | serve``.
"""

from .ann import build_faiss_index
from .archive import Searcher, SearchIndex, find_indexes, open_index
from .cli import main
from .encoder import SearchModel
from .indexer import IndexOptions, UnreadableImageError, build_index
from .manifest import IndexMismatchError, Manifest, read_manifest
from .sources import ImageItem, ImageSource, annotation_source, folder_source, webdataset_source
from .store import EmbeddingStore, exact_search

__all__ = [
    "EmbeddingStore",
    "ImageItem",
    "ImageSource",
    "IndexMismatchError",
    "IndexOptions",
    "Manifest",
    "SearchIndex",
    "SearchModel",
    "Searcher",
    "UnreadableImageError",
    "annotation_source",
    "build_faiss_index",
    "build_index",
    "exact_search",
    "find_indexes",
    "folder_source",
    "main",
    "open_index",
    "read_manifest",
    "webdataset_source",
]
