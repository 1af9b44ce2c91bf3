"""One file per VLM family; families never import each other."""
