"""Text and code embeddings by contrastive pre-training (CPT) on top of a chatforge GPT, and semantic search.

``model`` turns a GPT into an embedding model (end-token or mean pooling, query/document markers, InfoNCE,
gradient caching), ``data`` builds positive pairs, ``train`` is the ``embed`` stage, ``index`` the vector
index behind ``chatforge search`` and the retrieval tool, ``evaluate`` the retrieval and linear-probe
evaluation against MiniLM and an untrained floor.
"""
