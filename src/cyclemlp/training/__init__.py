"""Classification: training (:mod:`.train`), evaluation and prediction (:mod:`.evaluate`), and the
small engine they share with dense prediction (:mod:`.engine`)."""
