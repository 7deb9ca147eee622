"""The processes: `meterline up`, `core` and `ingest`. Their options (`options`, which every
command's parser holds), the command that reads them and runs one (`command`), the composition
of a core (`core`) and of an edge (`edge`), and the HTTP server both serve with (`server`)."""
