#compdef cdiff

_cdiff_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _CDIFF_COMPLETE=complete_zsh cdiff)
}

compdef _cdiff_completion cdiff

