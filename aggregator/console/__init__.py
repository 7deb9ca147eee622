"""The web console (`/`) and the customer usage page (`/portal`): static HTML, CSS and plain
JavaScript modules in `static/`, which call the JSON API with the token the browser holds."""
