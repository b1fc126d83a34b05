"""ComfyUI's API on the same server and port as A1111's (routes under / and /api), translated onto the one job
table: graph.py reduces a prompt to one sd job; routes.py serves /prompt, /history, /queue, /view, /upload,
/object_info, /system_stats, /interrupt, /free, /models, /embeddings and the /ws messages."""
