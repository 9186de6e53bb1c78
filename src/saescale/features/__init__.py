"""What every latent learned: streamed per-latent statistics and examples over an activation
cache (`sketch`, `contexts`), effects read off the weights (`effects`), and the pages a browser
shows (`pages`, `static/`). Knows the SAE and arrays, never Ray or storage (the job,
`service.feature_pass` and the `saescale view` command, `view_cli`, bring those)."""
